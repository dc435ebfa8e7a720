//! Reading an object's rows: file planning with partition and min/max pruning, row-group
//! pruning, and the [`IndexAccelerator`] implementation.
//!
//! A read of object `o` as of snapshot `s`:
//!
//! 1. loads `s`'s manifest list and the manifests whose partition summary may hold `o`'s
//!    bucket (cached by path: they are immutable); the live files of the others, as the
//!    manifest list counts them, are `pruned_by_partition`;
//! 2. skips every data file whose `bucket(do_id)` partition value differs from `o`'s
//!    (`pruned_by_partition`);
//! 3. skips files whose `do_id` (and, for lookups and scans, `key`; for change reads, `seq`)
//!    lower/upper bounds exclude the query (`pruned_by_min_max`);
//! 4. reads the Parquet footer of the rest (cached) and skips row groups whose `do_id` / `key`
//!    statistics exclude the query (a file all of whose row groups are excluded counts in
//!    `pruned_by_min_max`);
//! 5. probes the `do_id` (and, for a lookup, `key`) bloom filter of each remaining row group
//!    (cached, memory-bounded) and skips row groups the filter rules out; a file all of whose
//!    row groups are ruled out this way counts in `pruned_by_bloom`, not in `files_opened`;
//! 6. decodes only the remaining row groups.
//!
//! Every layer only skips data that cannot match (bloom filters have false positives, never
//! false negatives), so answers equal a full scan's. [`QueryStats`] reports each layer honestly:
//! `files_opened` counts files whose row groups were decoded, `bytes_read` counts bytes actually
//! fetched from the store for data files (footers and bloom filters included when not cached;
//! a completed read of a table state the catalog then reported outdated, discarded, included).

use std::collections::HashMap;
use std::ops::{Bound, Range};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use iceberg::spec::{
    DataContentType, DataFileFormat, Datum, Literal, ManifestContentType, ManifestFile, PrimitiveLiteral, SnapshotRef,
};
use iceberg::table::Table;
use object_store::path::Path;
use object_store::ObjectStore;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStreamBuilder};
use parquet::bloom_filter::Sbbf;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader, RowGroupMetaData};

use dotdo_core::accel::{latest_versions, IndexAccelerator, Lookup, QueryStats, Scan, ScanQuery, VersionedValue};
use dotdo_core::time::Stopwatch;
use dotdo_core::{AsOf, ChangeRecord, Error, ErrorKind, KeyRange, ObjectId, Op, Result};

use crate::error::{classify, classify_parquet, read_metadata_file};
use crate::store::IcebergColdStore;

/// Extra restrictions of a read beyond the object.
#[derive(Clone, Debug, Default)]
pub(crate) struct Filter {
    /// Only this key.
    pub key: Option<String>,
    /// Only keys in this range.
    pub range: Option<KeyRange>,
    /// Only records with `seq >= min_seq`.
    pub min_seq: Option<u64>,
    /// Only records with `seq <= max_seq`.
    pub max_seq: Option<u64>,
}

impl Filter {
    fn keeps_seq(&self, seq: u64) -> bool {
        self.min_seq.is_none_or(|min| seq >= min) && self.max_seq.is_none_or(|max| seq <= max)
    }

    fn keeps_key(&self, k: &str) -> bool {
        self.key.as_deref().is_none_or(|want| want == k) && self.range.as_ref().is_none_or(|r| r.contains(k))
    }

    /// Can a file/row group whose keys lie in `[lo, hi]` hold a matching key?
    fn key_overlaps(&self, lo: &str, hi: &str) -> bool {
        if let Some(k) = &self.key {
            if k.as_str() < lo || k.as_str() > hi {
                return false;
            }
        }
        if let Some(r) = &self.range {
            let (start, end) = r.as_bounds();
            let after_start = match start {
                Bound::Included(s) => hi >= s,
                Bound::Excluded(s) => hi > s,
                Bound::Unbounded => true,
            };
            let before_end = match end {
                Bound::Included(e) => lo <= e,
                Bound::Excluded(e) => lo < e,
                Bound::Unbounded => true,
            };
            if !(after_start && before_end) {
                return false;
            }
        }
        true
    }
}

/// What a manifest says about one data file.
#[derive(Debug)]
pub(crate) struct FileInfo {
    pub(crate) path: String,
    pub(crate) size: u64,
    /// `(spec id, bucket)`: the file's `bucket(do_id)` value under the partition spec of that
    /// id (the bucketer's when the manifest was read and cached). A read prunes by it only under
    /// the same spec: the bucketer of a store can follow the table's current spec, which another
    /// engine may change meanwhile.
    pub(crate) partition: Option<(i32, i32)>,
    do_id: Option<(String, String)>,
    key: Option<(String, String)>,
    seq_min: Option<i64>,
    seq_max: Option<i64>,
    /// The data file's format as its manifest records it (dotdo reads Parquet only).
    format: DataFileFormat,
}

/// The watermarks of one snapshot: those of the checkpoint file it names (decoded once and
/// shared: a table of a million objects makes one tens of MB, so an append must not copy it),
/// and its inline ones, which take precedence.
#[derive(Default)]
pub(crate) struct SnapshotMarks {
    base: Option<Arc<crate::summary::Watermarks>>,
    /// The snapshot's inline watermarks.
    pub(crate) inline: crate::summary::Watermarks,
    /// The checkpoint file it names.
    pub(crate) checkpoint: Option<String>,
    /// Its [`CARRIED`](crate::summary::CARRIED) count.
    pub(crate) carried: u64,
}

impl SnapshotMarks {
    /// The watermark of `object`, if the snapshot has one.
    pub(crate) fn get(&self, object: &ObjectId) -> Option<dotdo_core::Watermark> {
        self.inline.get(object).or_else(|| self.base.as_ref()?.get(object)).copied()
    }

    /// About how many bytes a checkpoint of every object's watermark would take.
    pub(crate) fn full_bytes(&self) -> u64 {
        // (The checkpoint's objects at a typical id length: summing a million ids per commit
        // costs more than the estimate is worth.)
        let base = self.base.as_ref().map_or(0, |b| b.len() as u64 * 64);
        base + crate::summary::inline_bytes(self.inline.keys())
    }

    /// Every object's watermark, with `changes` on top (a copy: for writing a new checkpoint).
    pub(crate) fn full_with(&self, changes: &crate::summary::Watermarks) -> crate::summary::Watermarks {
        let mut full = self.base.as_deref().cloned().unwrap_or_default();
        full.extend(self.inline.iter().chain(changes).map(|(k, v)| (k.clone(), *v)));
        full
    }
}

impl FileInfo {
    /// Whether the file is Parquet, the only data file format dotdo decodes.
    pub(crate) fn is_parquet(&self) -> bool {
        self.format == DataFileFormat::Parquet
    }

    /// The key of this file's cached footer and bloom filters: its path and size. dotdo never
    /// writes a path twice, but the format does not forbid another engine to remove a file and
    /// add different bytes under its path; a cache keyed by path alone would then prune the new
    /// file by the old one's statistics.
    fn cache_key(&self) -> String {
        format!("{}#{}", self.path, self.size)
    }

    /// About the bytes this entry holds (its path and bounds, and the fixed part).
    fn weight(&self) -> usize {
        let pair = |p: &Option<(String, String)>| p.as_ref().map_or(0, |(a, b)| a.len() + b.len());
        std::mem::size_of::<FileInfo>() + self.path.len() + pair(&self.do_id) + pair(&self.key) + ENTRY_OVERHEAD
    }
}

/// Caches of immutable files: manifest lists, manifests, Parquet footers.
#[derive(Default)]
pub(crate) struct FileCache {
    pub(crate) lists: parking_lot::Mutex<HashMap<String, Arc<Vec<ManifestFile>>>>,
    manifests: parking_lot::Mutex<Weighed<Arc<Vec<Arc<FileInfo>>>>>,
    footers: parking_lot::Mutex<Weighed<Arc<ParquetMetaData>>>,
    checkpoints: parking_lot::Mutex<HashMap<String, Arc<crate::summary::Watermarks>>>,
    blooms: parking_lot::Mutex<BloomCache>,
}

const CACHE_LIMIT: usize = 4096;

/// At most this many manifests are cached across all cached manifest lists (then the list cache
/// starts over). A streaming table's list grows by one manifest per commit, so caching every
/// list read or written would otherwise hold a quadratic number of entries.
const LIST_CACHE_MANIFESTS: usize = 100_000;

/// Cache a manifest list, within both [`CACHE_LIMIT`] and [`LIST_CACHE_MANIFESTS`] (a list
/// longer than that alone is not cached: it cleared the cache for every read of a new head of a
/// table of that many manifests, and was held beyond the bound).
fn put_list(map: &parking_lot::Mutex<HashMap<String, Arc<Vec<ManifestFile>>>>, k: String, v: Arc<Vec<ManifestFile>>) {
    if v.len() > LIST_CACHE_MANIFESTS {
        return;
    }
    let mut m = map.lock();
    let held: usize = m.values().map(|l| l.len()).sum();
    if m.len() >= CACHE_LIMIT || held + v.len() > LIST_CACHE_MANIFESTS {
        m.clear();
    }
    m.insert(k, v);
}

/// The key of a decoded manifest in the cache: its path and length, as footers are keyed (the
/// format does not forbid another engine to write different bytes under a removed file's
/// path; a cache keyed by path alone would then list the old manifest's files).
fn manifest_cache_key(mf: &ManifestFile) -> String {
    format!("{}#{}", mf.manifest_path, mf.manifest_length)
}

/// Bloom filters by (file, row group, column), bounded by their total size.
#[derive(Default)]
struct BloomCache {
    map: HashMap<(String, usize, usize), Arc<Sbbf>>,
    bytes: usize,
}

/// At most this many bytes of bloom filters are cached (then the cache starts over).
const BLOOM_CACHE_BYTES: usize = 64 << 20;

/// What a cache entry holds besides its key's and value's own bytes (the map's slot, `Arc`s,
/// `Vec` and `String` headers), counted against the byte bounds.
const ENTRY_OVERHEAD: usize = 96;

/// At most this many bytes of decoded manifests are cached. A compaction writes a manifest
/// listing most live files under a new path each time; counted by entries alone, superseded ones
/// could hold many times the live file list.
const MANIFEST_CACHE_BYTES: usize = 64 << 20;

impl BloomCache {
    fn get(&self, k: &(String, usize, usize)) -> Option<Arc<Sbbf>> {
        self.map.get(k).cloned()
    }

    fn put(&mut self, k: (String, usize, usize), v: Arc<Sbbf>) {
        // The filter's blocks, and what its entry holds besides: the key's path (a filter of
        // one 32-byte block is common, its key several times that) and the map's slot.
        let size = v.num_blocks() * 32 + k.0.len() + ENTRY_OVERHEAD;
        if size > BLOOM_CACHE_BYTES {
            // Larger than the whole cache (another writer's filter of up to 128 MiB): used once,
            // not kept (kept, it held the cache over its bound, and emptied it at every put).
            return;
        }
        if self.bytes + size > BLOOM_CACHE_BYTES {
            self.map.clear();
            self.bytes = 0;
        }
        if self.map.insert(k, v).is_none() {
            self.bytes += size;
        }
    }
}

/// A cache bounded by the bytes its entries hold as well as by their count.
pub(crate) struct Weighed<V> {
    map: HashMap<String, (V, usize)>,
    bytes: usize,
}

impl<V> Default for Weighed<V> {
    fn default() -> Self {
        Weighed { map: HashMap::new(), bytes: 0 }
    }
}

/// At most this many bytes of decoded Parquet footers are cached. A footer's size follows its
/// file's columns and row groups: a few KB for dotdo's files, megabytes for a wide table another
/// engine wrote, where [`CACHE_LIMIT`] footers alone could hold gigabytes.
const FOOTER_CACHE_BYTES: usize = 64 << 20;

impl<V: Clone> Weighed<V> {
    fn get(&self, k: &str) -> Option<V> {
        self.map.get(k).map(|(v, _)| v.clone())
    }

    /// Insert `v` weighing `size` bytes; other entries go (one at a time, arbitrary ones, as
    /// in [`put_bounded_to`]) until at most `limit` entries and `max_bytes` remain. An entry
    /// larger than `max_bytes` on its own is not kept.
    fn put(&mut self, k: String, v: V, size: usize, limit: usize, max_bytes: usize) {
        if let Some((_, old)) = self.map.remove(&k) {
            self.bytes -= old;
        }
        if size > max_bytes {
            return;
        }
        while self.map.len() >= limit || self.bytes + size > max_bytes {
            let Some(victim) = self.map.keys().next().cloned() else { break };
            if let Some((_, gone)) = self.map.remove(&victim) {
                self.bytes -= gone;
            }
        }
        self.bytes += size;
        self.map.insert(k, (v, size));
    }
}

/// Insert into a cache of at most `limit` entries; when full, one other entry goes. (Emptying it
/// whole made a table with more manifests than the limit miss on nearly every manifest of every
/// read: each read's pass emptied it again. Now a pass keeps about `limit` of them.)
fn put_bounded_to<V>(map: &parking_lot::Mutex<HashMap<String, V>>, k: String, v: V, limit: usize) {
    let mut m = map.lock();
    if m.len() >= limit && !m.contains_key(&k) {
        if let Some(old) = m.keys().next().cloned() {
            m.remove(&old);
        }
    }
    m.insert(k, v);
}

/// The live data files of manifest `mf` if its partition summary shows it lists none of
/// `bucket` (`bucket_at`: the bucket spec and field position), else `None`: a manifest of another
/// spec, without a summary at that field, without both bounds or without file counts is read.
fn excluded_files(mf: &ManifestFile, bucket_at: Option<(i32, usize)>, bucket: i32) -> Option<u64> {
    let (spec, pos) = bucket_at?;
    if mf.partition_spec_id != spec || mf.content != ManifestContentType::Data {
        return None;
    }
    let summary = mf.partitions.as_ref()?.get(pos)?;
    let int = |b: Option<&Vec<u8>>| b.and_then(|b| <[u8; 4]>::try_from(b.as_slice()).ok()).map(i32::from_le_bytes);
    let (lo, hi) = (int(summary.lower_bound.as_deref())?, int(summary.upper_bound.as_deref())?);
    let live = u64::from(mf.added_files_count?).saturating_add(u64::from(mf.existing_files_count?));
    (bucket < lo || bucket > hi).then_some(live)
}

/// Whether `mf` is a delete manifest that may list live delete files (another engine's
/// row-level deletes, which dotdo does not apply). One whose every entry is DELETED (left by a
/// rewrite that removed its delete files) describes nothing of its snapshot; counts a manifest
/// list does not record are taken as live.
pub(crate) fn lists_live_deletes(mf: &ManifestFile) -> bool {
    mf.content != iceberg::spec::ManifestContentType::Data
        && mf.added_files_count.unwrap_or(1).saturating_add(mf.existing_files_count.unwrap_or(1)) > 0
}

/// Every column chunk and bloom filter the footer of the data file `path` (`file_size` bytes)
/// points at lies inside the file. parquet asserts that the ranges it reads are not negative,
/// and object stores' range reads panic on a range past the object's end: a damaged or foreign
/// footer is `Corrupt` here, naming the file, row group and column, before anything reads by it.
pub(crate) fn check_footer_ranges(row_groups: &[RowGroupMetaData], file_size: u64, path: &str) -> Result<()> {
    let inside = |start: i64, len: i64| {
        u64::try_from(start)
            .ok()
            .zip(u64::try_from(len).ok())
            .and_then(|(s, l)| s.checked_add(l))
            .is_some_and(|end| end <= file_size)
    };
    for (rg, group) in row_groups.iter().enumerate() {
        for (c, col) in group.columns().iter().enumerate() {
            let start = col.dictionary_page_offset().unwrap_or(col.data_page_offset());
            let bloom = col.bloom_filter_offset().map(|o| (o, i64::from(col.bloom_filter_length().unwrap_or(0))));
            let (what, start, len) = match bloom {
                Some((o, l)) if !inside(o, l) => ("bloom filter", o, l),
                _ => ("column chunk", start, col.compressed_size()),
            };
            if !inside(start, len) {
                return Err(Error::corrupt(format!(
                    "data file {path}: row group {rg}, column {c}: its {what} at {start} ({len} bytes) is not \
                     inside the file ({file_size} bytes)"
                )));
            }
        }
    }
    Ok(())
}

/// Checkpoint files kept decoded (each holds every object's watermark: a table of a million
/// objects makes one tens of MB).
const CHECKPOINTS_CACHED: usize = 4;

/// `records` (of `object`, each with the index in `files` of the data file it was read from) in
/// sequence order, one per sequence number. Files are read concurrently, so without this the
/// order of equal sequence numbers, and which of them a fold keeps, would vary from read to read:
/// the same record found twice (a file another engine added twice) counts once, and two
/// different records under one sequence number are `Corrupt`, naming the files they are in (which
/// one holds cannot be known). Only the rows a read keeps are compared: a key-filtered lookup
/// may answer where a read of the whole object finds the clash.
fn one_per_seq(
    mut records: Vec<(ChangeRecord, usize)>,
    files: &[String],
    object: &ObjectId,
) -> Result<Vec<ChangeRecord>> {
    records.sort_by_key(|(r, _)| r.seq);
    if let Some(w) = records.windows(2).find(|w| w[0].0.seq == w[1].0.seq && w[0].0 != w[1].0) {
        let ((a, fa), (b, fb)) = (&w[0], &w[1]);
        let file = |i: &usize| files.get(*i).map_or("?", String::as_str);
        let place = if fa == fb {
            format!("both in data file {}", file(fa))
        } else {
            format!("in data files {} and {}", file(fa), file(fb))
        };
        return Err(Error::corrupt(format!(
            "two different change records of {object} with seq {} are in the table (keys {:?} and {:?}, {place})",
            a.seq, a.key, b.key
        )));
    }
    records.dedup_by(|a, b| a.0.seq == b.0.seq);
    Ok(records.into_iter().map(|(r, _)| r).collect())
}

fn string_of(d: Option<&Datum>) -> Option<String> {
    match d.map(Datum::literal) {
        Some(PrimitiveLiteral::String(s)) => Some(s.clone()),
        _ => None,
    }
}

fn long_of(d: Option<&Datum>) -> Option<i64> {
    match d.map(Datum::literal) {
        Some(PrimitiveLiteral::Long(v)) => Some(*v),
        _ => None,
    }
}

/// Fetches byte ranges of one object, counting the bytes.
struct StoreReader {
    store: Arc<dyn ObjectStore>,
    path: Path,
    bytes: Arc<AtomicU64>,
    metadata: Arc<ParquetMetaData>,
}

/// [`check_range_read`](crate::storage::check_range_read) as a Parquet reader's error.
fn whole_range(path: &Path, range: &Range<u64>, bytes: &Bytes) -> parquet::errors::Result<()> {
    crate::storage::check_range_read(path, range, bytes)
        .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
}

impl AsyncFileReader for StoreReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            let b = self
                .store
                .get_range(&self.path, range.clone())
                .await
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?;
            whole_range(&self.path, &range, &b)?;
            self.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
            Ok(b)
        }
        .boxed()
    }

    fn get_byte_ranges(&mut self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move {
            let b = self
                .store
                .get_ranges(&self.path, &ranges)
                .await
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?;
            for (range, got) in ranges.iter().zip(&b) {
                whole_range(&self.path, range, got)?;
            }
            self.bytes.fetch_add(b.iter().map(|x| x.len() as u64).sum(), Ordering::Relaxed);
            Ok(b)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        let m = self.metadata.clone();
        async move { Ok(m) }.boxed()
    }
}

struct FooterFetch<'a> {
    store: &'a dyn ObjectStore,
    path: &'a Path,
    bytes: &'a AtomicU64,
}

impl parquet::arrow::async_reader::MetadataFetch for FooterFetch<'_> {
    fn fetch(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            let b = self
                .store
                .get_range(self.path, range.clone())
                .await
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?;
            whole_range(self.path, &range, &b)?;
            self.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
            Ok(b)
        }
        .boxed()
    }
}

/// Per-file outcome of reading.
#[derive(Default)]
struct FileRead {
    records: Vec<ChangeRecord>,
    row_groups: u64,
    /// Every row group left after statistics was ruled out by a bloom filter.
    pruned_by_bloom: bool,
    /// Every row group was ruled out by its statistics (or the file has none): nothing decoded.
    pruned_by_stats: bool,
}

impl IcebergColdStore {
    /// The watermarks of `snapshot` of the table `md`: its checkpoint file's (shared with the
    /// cache, not copied) with its inline ones on top. A snapshot another engine wrote has the
    /// watermarks of its nearest dotdo ancestor ([`crate::summary::dotdo_base`]).
    pub(crate) async fn watermarks_of(
        &self,
        md: &iceberg::spec::TableMetadata,
        snapshot: Option<&SnapshotRef>,
    ) -> Result<SnapshotMarks> {
        let Some(s) = snapshot else {
            crate::summary::refuse_lost_head(md)?;
            return Ok(SnapshotMarks::default());
        };
        let Some(s) = crate::summary::dotdo_base(md, s)? else { return Ok(SnapshotMarks::default()) };
        let inline = crate::summary::inline_watermarks(&s)?;
        let carried = crate::summary::carried(&s);
        let Some(cp) = crate::summary::checkpoint(&s) else {
            return Ok(SnapshotMarks { base: None, inline, checkpoint: None, carried });
        };
        let base = self.checkpoint_file(cp).await?;
        Ok(SnapshotMarks { base: Some(base), inline, checkpoint: Some(cp.to_string()), carried })
    }

    /// The watermark of one object in `snapshot`, reading the checkpoint only if needed.
    pub(crate) async fn watermark_in(
        &self,
        md: &iceberg::spec::TableMetadata,
        snapshot: &SnapshotRef,
        object: &ObjectId,
    ) -> Result<dotdo_core::Watermark> {
        let mut w = self.watermarks_in(md, snapshot, std::slice::from_ref(object)).await?;
        Ok(w.pop().unwrap_or_default())
    }

    /// The watermarks of `objects` in `snapshot`: its inline watermarks decoded once, the
    /// checkpoint read only if one of them is not inline.
    pub(crate) async fn watermarks_in(
        &self,
        md: &iceberg::spec::TableMetadata,
        snapshot: &SnapshotRef,
        objects: &[ObjectId],
    ) -> Result<Vec<dotdo_core::Watermark>> {
        let Some(snapshot) = crate::summary::dotdo_base(md, snapshot)? else {
            return Ok(vec![dotdo_core::Watermark::default(); objects.len()]);
        };
        let inline = crate::summary::inline_watermarks(&snapshot)?;
        let checkpoint = crate::summary::checkpoint(&snapshot);
        let mut base: Option<Arc<crate::summary::Watermarks>> = None;
        let mut out = Vec::with_capacity(objects.len());
        for o in objects {
            let w = match (inline.get(o), checkpoint) {
                (Some(w), _) => *w,
                (None, Some(cp)) => {
                    if base.is_none() {
                        base = Some(self.checkpoint_file(cp).await?);
                    }
                    base.as_ref().and_then(|b| b.get(o)).copied().unwrap_or_default()
                }
                (None, None) => dotdo_core::Watermark::default(),
            };
            out.push(w);
        }
        Ok(out)
    }

    async fn checkpoint_file(&self, location: &str) -> Result<Arc<crate::summary::Watermarks>> {
        if let Some(w) = self.inner.cache.checkpoints.lock().get(location).cloned() {
            return Ok(w);
        }
        // The location comes from a snapshot summary (dotdo writes it next to the table's
        // metadata).
        let key = self.inner.root.table_file_key(location, "the watermark checkpoint a snapshot summary names")?;
        let what = format!("watermark checkpoint {location}");
        let bytes = match self.inner.root.store.get(&key).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        }
        .map_err(|e| crate::error::classify_object_store(e).context(&what))?;
        let w = Arc::new(crate::summary::decode_watermarks(&bytes, &what)?);
        put_bounded_to(&self.inner.cache.checkpoints, location.to_string(), w.clone(), CHECKPOINTS_CACHED);
        Ok(w)
    }

    /// Write a checkpoint file of `w` next to the table metadata; returns its location.
    pub(crate) async fn write_checkpoint(&self, table: &Table, w: &crate::summary::Watermarks) -> Result<String> {
        let location =
            format!("{}/metadata/dotdo-watermarks-{}.json", table.metadata().location(), uuid::Uuid::new_v4());
        let body = crate::summary::encode_watermarks(w);
        // Through the table's file IO, like every other file of a commit: with
        // `sync_local_files` it is fsynced before the commit that names it.
        let out = table.file_io().new_output(&location).map_err(|e| classify(e, &format!("writing {location}")))?;
        out.write(Bytes::from(body)).await.map_err(|e| classify(e, &format!("writing {location}")))?;
        put_bounded_to(&self.inner.cache.checkpoints, location.clone(), Arc::new(w.clone()), CHECKPOINTS_CACHED);
        Ok(location)
    }

    /// The manifests listed by `snapshot`'s manifest list (cached by path: it is immutable).
    pub(crate) async fn manifests_of(&self, table: &Table, snapshot: &SnapshotRef) -> Result<Arc<Vec<ManifestFile>>> {
        let cache = &self.inner.cache;
        let list_path = snapshot.manifest_list().to_string();
        let cached = cache.lists.lock().get(&list_path).cloned();
        match cached {
            Some(m) => Ok(m),
            None => {
                let what = format!("manifest list {list_path}");
                let list = read_metadata_file(&what, table.manifest_list_reader(snapshot).load()).await?;
                let m = Arc::new(list.entries().to_vec());
                put_list(&cache.lists, list_path, m.clone());
                Ok(m)
            }
        }
    }

    /// Remember the manifests of a manifest list this store has just written.
    pub(crate) fn remember_manifests(&self, list_path: &str, manifests: Vec<ManifestFile>) {
        put_list(&self.inner.cache.lists, list_path.to_string(), Arc::new(manifests));
    }

    /// The live data files of `snapshot`, each once (also one another engine added twice). With
    /// `bucket`, a manifest whose partition summary
    /// rules that bucket out is not read (nor fetched): the second value counts the live files
    /// such manifests list, as the manifest list records them.
    pub(crate) async fn files_of(
        &self,
        table: &Table,
        snapshot: &SnapshotRef,
        bucket: Option<i32>,
    ) -> Result<(Vec<Arc<FileInfo>>, u64)> {
        let manifests = self.manifests_of(table, snapshot).await?;
        // Row-level deletes (merge-on-read, as Trino or Spark write them) are not applied by
        // dotdo's reads: answering without them would return deleted rows.
        if let Some(mf) = manifests.iter().find(|mf| lists_live_deletes(mf)) {
            return Err(Error::invalid(format!(
                "{}: snapshot {} has row-level delete files (manifest {}), written by another engine; \
                 dotdo does not apply them: rewrite the table without deletes (copy-on-write)",
                table.identifier(),
                snapshot.snapshot_id(),
                mf.manifest_path
            )));
        }
        self.data_files_of(table, snapshot, bucket).await
    }

    /// [`files_of`](Self::files_of) without refusing row-level delete files (for a reader that
    /// applies them itself: iceberg's, in user-table scans).
    pub(crate) async fn data_files_of(
        &self,
        table: &Table,
        snapshot: &SnapshotRef,
        bucket: Option<i32>,
    ) -> Result<(Vec<Arc<FileInfo>>, u64)> {
        let cache = &self.inner.cache;
        let manifests = self.manifests_of(table, snapshot).await?;
        let schema = table.metadata().current_schema();
        let id = |n: &str| schema.field_id_by_name(n).unwrap_or(-1);
        let (do_id_f, key_f, seq_f) = (id("do_id"), id("key"), id("seq"));
        let bucket_at = self.bucketer_for(table).and_then(|b| b.spec);
        let mut skipped = 0u64;
        let mut wanted = Vec::with_capacity(manifests.len());
        for mf in manifests.iter() {
            if mf.content == ManifestContentType::Data
                && mf.added_files_count == Some(0)
                && mf.existing_files_count == Some(0)
            {
                // Only removals (an earlier rewrite's record, kept for the cleanup): nothing to read.
                continue;
            }
            match bucket.and_then(|b| excluded_files(mf, bucket_at, b)) {
                Some(n) => skipped = skipped.saturating_add(n),
                None => wanted.push(mf.clone()),
            }
        }
        let loads = wanted.into_iter().map(|mf| async move {
            let key = manifest_cache_key(&mf);
            let cached = cache.manifests.lock().get(&key);
            if let Some(c) = cached {
                return Ok::<_, Error>(c);
            }
            let what = format!("manifest {}", mf.manifest_path);
            let m = read_metadata_file(&what, mf.load_manifest(table.file_io())).await?;
            let files: Vec<Arc<FileInfo>> = m
                .entries()
                .iter()
                .filter(|e| e.is_alive() && e.data_file().content_type() == DataContentType::Data)
                .map(|e| {
                    let df = e.data_file();
                    // Only under the spec the bucketer belongs to, at its do_id field: a file
                    // written under another spec (evolved by another engine) is never pruned.
                    let partition = match bucket_at {
                        Some((spec, pos)) if spec == mf.partition_spec_id => match df.partition().fields().get(pos) {
                            Some(Some(Literal::Primitive(PrimitiveLiteral::Int(b)))) => Some((spec, *b)),
                            _ => None,
                        },
                        _ => None,
                    };
                    let bounds = |f| string_of(df.lower_bounds().get(&f)).zip(string_of(df.upper_bounds().get(&f)));
                    Arc::new(FileInfo {
                        path: df.file_path().to_string(),
                        size: df.file_size_in_bytes(),
                        partition,
                        do_id: bounds(do_id_f),
                        key: bounds(key_f),
                        seq_min: long_of(df.lower_bounds().get(&seq_f)),
                        seq_max: long_of(df.upper_bounds().get(&seq_f)),
                        format: df.file_format(),
                    })
                })
                .collect();
            let files = Arc::new(files);
            let weight = files.iter().map(|f| f.weight()).sum::<usize>() + mf.manifest_path.len() + ENTRY_OVERHEAD;
            cache.manifests.lock().put(key, files.clone(), weight, CACHE_LIMIT, MANIFEST_CACHE_BYTES);
            Ok(files)
        });
        let per_manifest: Vec<Arc<Vec<Arc<FileInfo>>>> = futures::stream::iter(loads).buffered(8).try_collect().await?;
        // A file another engine added twice is one file: read, counted and rewritten once.
        let mut seen = std::collections::HashSet::new();
        let files =
            per_manifest.iter().flat_map(|v| v.iter()).filter(|f| seen.insert(f.path.as_str())).cloned().collect();
        Ok((files, skipped))
    }

    /// All records of `object` visible in `snapshot` that may match `filter` (callers apply the
    /// exact filter), in sequence order, one per sequence number, with the statistics of the read.
    pub(crate) async fn records_of(
        &self,
        table: &Table,
        snapshot: Option<&SnapshotRef>,
        object: &ObjectId,
        filter: &Filter,
    ) -> Result<(Vec<ChangeRecord>, QueryStats)> {
        let mut stats = QueryStats::default();
        let Some(snapshot) = snapshot else { return Ok((Vec::new(), stats)) };
        // Another engine may have changed the schema since the table was opened.
        crate::schema::check_field_ids(table.metadata(), &format!("table {}", table.identifier()))?;
        stats.snapshot = Some(snapshot.snapshot_id());
        // The object's bucket under the spec the bucketer belongs to.
        let bucket = match self.bucketer_for(table) {
            Some(b) => b.spec.map(|(spec, _)| b.bucket(object.as_str()).map(|n| (spec, n))).transpose()?,
            None => None,
        };
        let (files, in_skipped_manifests) = self.files_of(table, snapshot, bucket.map(|(_, n)| n)).await?;
        stats.files_total = (files.len() as u64).saturating_add(in_skipped_manifests);
        stats.pruned_by_partition = in_skipped_manifests;
        let o = object.as_str();
        let mut open = Vec::new();
        for f in files {
            if f.partition.zip(bucket).is_some_and(|((spec, b), (want_spec, want))| spec == want_spec && b != want) {
                stats.pruned_by_partition += 1;
                continue;
            }
            let out_of_bounds = f.do_id.as_ref().is_some_and(|(lo, hi)| o < lo.as_str() || o > hi.as_str())
                || f.key.as_ref().is_some_and(|(lo, hi)| !filter.key_overlaps(lo, hi))
                || f.seq_max.zip(filter.min_seq).is_some_and(|(max, min)| max < i64::try_from(min).unwrap_or(i64::MAX))
                || f.seq_min.zip(filter.max_seq).is_some_and(|(min, max)| min > i64::try_from(max).unwrap_or(i64::MAX));
            if out_of_bounds {
                stats.pruned_by_min_max += 1;
                continue;
            }
            open.push(f);
        }
        let bytes = Arc::new(AtomicU64::new(0));
        // Data files' columns are found by their field ids in the current schema.
        let ids = crate::schema::ColumnIds::of(table.metadata().current_schema());
        let reads = open.into_iter().map(|f| {
            let bytes = bytes.clone();
            async move { Ok((self.read_file(&f, object, filter, &ids, bytes).await?, f)) }
        });
        let results: Vec<(FileRead, Arc<FileInfo>)> =
            futures::stream::iter(reads).buffer_unordered(4).try_collect().await?;
        let mut records = Vec::new();
        let mut paths = Vec::with_capacity(results.len());
        for (r, f) in results {
            if r.pruned_by_stats {
                stats.pruned_by_min_max += 1;
            } else if r.pruned_by_bloom {
                stats.pruned_by_bloom += 1;
            } else {
                stats.files_opened += 1;
            }
            stats.row_groups_read += r.row_groups;
            let file = paths.len();
            paths.push(f.path.clone());
            records.extend(r.records.into_iter().map(|rec| (rec, file)));
        }
        stats.bytes_read = bytes.load(Ordering::Relaxed);
        Ok((one_per_seq(records, &paths, object)?, stats))
    }

    async fn footer(&self, f: &FileInfo, path: &Path, bytes: &AtomicU64) -> Result<Arc<ParquetMetaData>> {
        if let Some(m) = self.inner.cache.footers.lock().get(&f.cache_key()) {
            return Ok(m);
        }
        let fetch = FooterFetch { store: &*self.inner.root.store, path, bytes };
        let m = ParquetMetaDataReader::new()
            .with_prefetch_hint(Some(64 * 1024))
            .load_and_finish(fetch, f.size)
            .await
            .map_err(|e| classify_parquet(e, &f.path))?;
        check_footer_ranges(m.row_groups(), f.size, &f.path)?;
        let m = Arc::new(m);
        let size = m.memory_size();
        self.inner.cache.footers.lock().put(f.cache_key(), m.clone(), size, CACHE_LIMIT, FOOTER_CACHE_BYTES);
        Ok(m)
    }

    async fn read_file(
        &self,
        f: &FileInfo,
        object: &ObjectId,
        filter: &Filter,
        ids: &crate::schema::ColumnIds,
        bytes: Arc<AtomicU64>,
    ) -> Result<FileRead> {
        let path = self.inner.root.table_file_key(&f.path, "data file")?;
        let read = self.read_file_at(f, &path, object, filter, ids, bytes);
        match crate::error::panic_is_corrupt(&format!("data file {}", f.path), read).await {
            Err(e) if e.is_retryable() => Err(self.damaged_or(e, f, &path).await),
            r => r,
        }
    }

    /// A read that failed on a reachable file whose size is not the one its manifest records
    /// failed on damage (an unsynced file after a power loss, a partial upload), which no retry
    /// mends: `Corrupt` naming the file. Otherwise the original, retryable error.
    async fn damaged_or(&self, e: Error, f: &FileInfo, path: &Path) -> Error {
        match self.inner.root.store.head(path).await {
            Ok(m) if m.size != f.size => Error::corrupt(format!(
                "data file {}: {} bytes long, its manifest records {} ({e})",
                f.path, m.size, f.size
            )),
            _ => e,
        }
    }

    async fn read_file_at(
        &self,
        f: &FileInfo,
        path: &Path,
        object: &ObjectId,
        filter: &Filter,
        ids: &crate::schema::ColumnIds,
        bytes: Arc<AtomicU64>,
    ) -> Result<FileRead> {
        if !f.is_parquet() {
            // Another engine's table may hold ORC or Avro data files: they are not damaged,
            // dotdo cannot decode them (reporting them Corrupt sent operators looking for damage).
            return Err(Error::new(
                ErrorKind::Backend,
                format!("data file {} is {:?}: dotdo reads Parquet data files only", f.path, f.format),
            ));
        }
        let path = path.clone();
        let meta = self.footer(f, &path, &bytes).await?;
        let o = object.as_str().as_bytes();
        let col = |name: &str| ids.parquet_column(meta.file_metadata().schema_descr(), name);
        let (do_id_c, key_c) = (col("do_id"), col("key"));
        let mut groups = Vec::new();
        for (i, rg) in meta.row_groups().iter().enumerate() {
            // String bounds only from the current statistics fields: the deprecated min/max of
            // old writers (parquet-mr before 1.10) were ordered as signed bytes, wrong for
            // non-ASCII text, and must not prune.
            let stat = |c: Option<usize>| {
                c.and_then(|c| rg.column(c).statistics())
                    .filter(|s| !s.is_min_max_deprecated())
                    .and_then(|s| Some((s.min_bytes_opt()?, s.max_bytes_opt()?)))
            };
            if let Some((lo, hi)) = stat(do_id_c) {
                if o < lo || o > hi {
                    continue;
                }
            }
            // Bounds another writer cut inside a UTF-8 character are not text: no pruning by
            // them (decoded lossily, a lower bound could land above real keys).
            if let Some((Ok(lo), Ok(hi))) =
                stat(key_c).map(|(lo, hi)| (std::str::from_utf8(lo), std::str::from_utf8(hi)))
            {
                if !filter.key_overlaps(lo, hi) {
                    continue;
                }
            }
            groups.push(i);
        }
        if groups.is_empty() {
            // Ruled out by row-group statistics: a min/max prune, the file not opened for rows.
            return Ok(FileRead { records: Vec::new(), row_groups: 0, pruned_by_bloom: false, pruned_by_stats: true });
        }
        let mut pruned_by_bloom = false;
        if self.inner.settings.bloom_filters {
            let mut probes = vec![(do_id_c, object.as_str())];
            if let Some(k) = &filter.key {
                probes.push((key_c, k.as_str()));
            }
            let probes: Vec<(usize, &str)> = probes.into_iter().filter_map(|(c, v)| Some((c?, v))).collect();
            let mut kept = Vec::with_capacity(groups.len());
            for i in groups {
                if !self.bloom_excludes(f, &path, &meta, i, &probes, &bytes).await? {
                    kept.push(i);
                }
            }
            pruned_by_bloom = kept.is_empty();
            groups = kept;
        }
        let mut out =
            FileRead { records: Vec::new(), row_groups: groups.len() as u64, pruned_by_bloom, pruned_by_stats: false };
        if groups.is_empty() {
            return Ok(out);
        }
        let arm = ArrowReaderMetadata::try_new(meta.clone(), ArrowReaderOptions::new())
            .map_err(|e| classify_parquet(e, &f.path))?;
        let reader = StoreReader { store: self.inner.root.store.clone(), path, bytes, metadata: meta };
        let mut stream = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, arm)
            .with_row_groups(groups)
            .build()
            .map_err(|e| classify_parquet(e, &f.path))?;
        let oid = object.as_str();
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| classify_parquet(e, &f.path))?;
            let from = out.records.len();
            crate::schema::from_batch(&batch, &f.path, ids, |d, k| d == oid && filter.keeps_key(k), &mut out.records)?;
            // Records outside the filter's sequence range are dropped batch by batch: a read of
            // a few changes never holds an object's whole tail.
            if filter.min_seq.is_some() || filter.max_seq.is_some() {
                let batch_records = out.records.split_off(from);
                out.records.extend(batch_records.into_iter().filter(|r| filter.keeps_seq(r.seq)));
            }
        }
        Ok(out)
    }

    /// Does a bloom filter of row group `rg` rule out one of `probes` (column index, value)?
    /// Filters are fetched (both columns in one request) and cached; a column without a filter,
    /// or whose filter length the footer does not record, rules nothing out.
    async fn bloom_excludes(
        &self,
        f: &FileInfo,
        path: &Path,
        meta: &ParquetMetaData,
        rg: usize,
        probes: &[(usize, &str)],
        bytes: &AtomicU64,
    ) -> Result<bool> {
        let mut missing = Vec::new();
        {
            let cache = self.inner.cache.blooms.lock();
            let key = f.cache_key();
            for &(c, v) in probes {
                match cache.get(&(key.clone(), rg, c)) {
                    Some(sbbf) if !sbbf.check(v) => return Ok(true),
                    Some(_) => {}
                    None => missing.push((c, v)),
                }
            }
        }
        let mut ranges = Vec::new();
        let mut wanted = Vec::new();
        for (c, v) in missing {
            let col = meta.row_group(rg).column(c);
            let (Some(off), Some(len)) = (col.bloom_filter_offset(), col.bloom_filter_length()) else { continue };
            let (Ok(off), Ok(len)) = (u64::try_from(off), u64::try_from(len)) else { continue };
            // A filter of no bytes (another engine's footer) is no filter: nothing to fetch (an
            // empty range read is refused by some stores), nothing pruned.
            if len == 0 {
                continue;
            }
            ranges.push(off..off + len);
            wanted.push((c, v));
        }
        if ranges.is_empty() {
            return Ok(false);
        }
        let fetched = self
            .inner
            .root
            .store
            .get_ranges(path, &ranges)
            .await
            .map_err(|e| crate::error::classify_object_store(e).context(format!("bloom filters of {}", f.path)))?;
        for (range, b) in ranges.iter().zip(&fetched) {
            crate::storage::check_range_read(path, range, b)?;
        }
        bytes.fetch_add(fetched.iter().map(|b| b.len() as u64).sum(), Ordering::Relaxed);
        let mut excluded = false;
        for ((c, v), b) in wanted.into_iter().zip(fetched) {
            let sbbf = Sbbf::from_bytes(&b).map_err(|e| classify_parquet(e, &f.path))?;
            if sbbf.num_blocks() == 0 {
                // parquet's `check` indexes the first block unconditionally.
                return Err(Error::corrupt(format!(
                    "{}: the bloom filter of row group {rg}, column {c} has no blocks",
                    f.path
                )));
            }
            let sbbf = Arc::new(sbbf);
            excluded |= !sbbf.check(v);
            self.inner.cache.blooms.lock().put((f.cache_key(), rg, c), sbbf);
        }
        Ok(excluded)
    }

    async fn query(&self, object: &ObjectId, as_of: AsOf, filter: Filter) -> Result<(Vec<ChangeRecord>, QueryStats)> {
        crate::store::latest_once_more(as_of, || self.query_once(object, as_of, &filter)).await
    }

    async fn query_once(
        &self,
        object: &ObjectId,
        as_of: AsOf,
        filter: &Filter,
    ) -> Result<(Vec<ChangeRecord>, QueryStats)> {
        let sw = Stopwatch::start(self.inner.clock.clone());
        let read_on = |table: Table| async move {
            let snap = Self::resolve(&table, as_of)?;
            if let Some(s) = &snap {
                crate::store::check_history(table.metadata(), s)?;
            }
            self.read_at(snap.as_ref(), self.records_of(&table, snap.as_ref(), object, filter)).await
        };
        let (records, mut stats) = if self.inner.settings.refresh_reads {
            // Read the table state we know while the catalog is asked whether it is still
            // current (with a SQL catalog that is most of a warm lookup's time); if it is not,
            // that read is discarded and the current table is read. Either way the answer is
            // that of the table current when the read started.
            let known = self.table();
            let (current, speculative) = futures::join!(self.read_table(), read_on(known.clone()));
            let current = current?;
            if current.metadata_location().is_some() && current.metadata_location() == known.metadata_location() {
                speculative?
            } else {
                // The discarded read's bytes were fetched all the same: they count.
                let wasted = speculative.as_ref().map_or(0, |(_, s)| s.bytes_read);
                let (records, mut stats) = read_on(current).await?;
                stats.bytes_read += wasted;
                (records, stats)
            }
        } else {
            read_on(self.table()).await?
        };
        stats.elapsed = sw.elapsed();
        Ok((records, stats))
    }
}

#[async_trait]
impl IndexAccelerator for IcebergColdStore {
    async fn lookup(&self, object: &ObjectId, key: &str, as_of: AsOf) -> Result<Lookup> {
        dotdo_core::ids::validate_key(key)?;
        let (records, stats) =
            self.query(object, as_of, Filter { key: Some(key.to_string()), ..Default::default() }).await?;
        let value = latest_versions(records).into_values().next().filter(|v| v.op == Op::Put);
        Ok(Lookup { value, stats })
    }

    async fn scan(&self, query: ScanQuery) -> Result<Scan> {
        let filter = Filter { range: Some(query.keys.clone()), ..Default::default() };
        let (records, stats) = self.query(&query.object, query.as_of, filter).await?;
        let mut entries: Vec<VersionedValue> = latest_versions(records)
            .into_values()
            .filter(|v| v.op == Op::Put && query.keys.contains(&v.key))
            .filter(|v| query.type_name.as_ref().is_none_or(|t| &v.type_name == t))
            .filter(|v| query.time_range.is_none_or(|(from, to)| v.timestamp >= from && v.timestamp < to))
            .collect();
        if let Some(n) = query.limit {
            entries.truncate(n);
        }
        Ok(Scan { entries, stats })
    }
}

#[cfg(test)]
mod tests {

    fn record(seq: u64, key: &str) -> ChangeRecord {
        ChangeRecord {
            object: ObjectId::new("o").expect("id"),
            seq,
            key: key.into(),
            op: dotdo_core::Op::Put,
            value: bytes::Bytes::from_static(b"v"),
            token: dotdo_core::FencingToken::new(1),
            timestamp: dotdo_core::Timestamp::from_micros(seq as i64),
            type_name: "T".into(),
        }
    }

    /// The footer cache holds at most its byte budget and its entry count; an entry over the
    /// budget alone is not kept, and replacing an entry does not count it twice.
    #[test]
    fn weighed_cache_keeps_to_bytes_and_count() {
        let mut c: Weighed<u32> = Weighed::default();
        for i in 0..10u32 {
            c.put(format!("f{i}"), i, 30, 100, 100);
            assert!(c.bytes <= 100 && c.map.len() <= 3, "{} bytes in {} entries", c.bytes, c.map.len());
            assert_eq!(c.get(&format!("f{i}")), Some(i), "the newest entry stays");
        }
        assert_eq!(c.bytes, c.map.values().map(|(_, s)| s).sum::<usize>());
        c.put("big".into(), 99, 101, 100, 100);
        assert_eq!(c.get("big"), None, "larger than the budget: not kept");
        let held = c.bytes;
        c.put("f9".into(), 9, 30, 100, 100);
        assert_eq!(c.bytes, held, "replacing an entry keeps its weight once");
        for i in 0..10u32 {
            c.put(format!("g{i}"), i, 1, 4, 100);
            assert!(c.map.len() <= 4);
        }
    }

    /// A footer whose column chunk or bloom filter lies outside the file (negative offsets or
    /// sizes, or past the end: parquet and object stores panicked on them) is `Corrupt` naming
    /// the file, row group and column; ranges inside it pass.
    #[test]
    fn footer_ranges_outside_the_file_are_corrupt() {
        use parquet::file::metadata::ColumnChunkMetaData;
        use parquet::schema::types::SchemaDescriptor;
        let schema = parquet::schema::parser::parse_message_type("message m { required int64 a; }").expect("schema");
        let descr = Arc::new(SchemaDescriptor::new(Arc::new(schema)));
        let group = |start: i64, len: i64, bloom: Option<(i64, i32)>| {
            let col = ColumnChunkMetaData::builder(descr.column(0))
                .set_data_page_offset(start)
                .set_total_compressed_size(len)
                .set_bloom_filter_offset(bloom.map(|b| b.0))
                .set_bloom_filter_length(bloom.map(|b| b.1))
                .build()
                .expect("column");
            RowGroupMetaData::builder(descr.clone()).set_num_rows(1).set_column_metadata(vec![col]).build().expect("rg")
        };
        let check = |g| check_footer_ranges(&[group(4, 10, None), g], 100, "data/f.parquet");
        check(group(4, 90, Some((94, 6)))).expect("inside");
        for (start, len, bloom) in
            [(-1, 10, None), (4, -10, None), (4, 97, None), (i64::MAX, i64::MAX, None), (4, 10, Some((95, 6)))]
        {
            let e = check(group(start, len, bloom)).expect_err("outside");
            assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{e}");
            assert!(e.to_string().contains("data/f.parquet") && e.to_string().contains("row group 1"), "{e}");
        }
    }

    /// A path another engine filled with other bytes (another size, as its manifest records)
    /// finds none of the old file's cached footer or bloom filters.
    #[test]
    fn cached_footers_are_keyed_by_path_and_size() {
        let file = |size| FileInfo {
            path: "s3://b/t/data/p.parquet".into(),
            size,
            partition: None,
            do_id: None,
            key: None,
            seq_min: None,
            seq_max: None,
            format: DataFileFormat::Parquet,
        };
        assert_eq!(file(100).cache_key(), file(100).cache_key());
        assert_ne!(file(100).cache_key(), file(101).cache_key());
    }

    /// Cached manifests are bounded in bytes, each entry weighed by its paths and bounds: a
    /// manifest of files with long key bounds weighs more than the entry count says, and the
    /// cache keeps within its byte bound whatever the number of entries.
    #[test]
    fn cached_manifests_are_bounded_in_bytes() {
        let long = "k".repeat(1000);
        let file = |i: usize| FileInfo {
            path: format!("s3://b/t/data/{i:06}.parquet"),
            size: 1,
            partition: Some((0, 0)),
            do_id: Some(("a".into(), "z".into())),
            key: Some((long.clone(), long.clone())),
            seq_min: Some(1),
            seq_max: Some(2),
            format: DataFileFormat::Parquet,
        };
        assert!(file(0).weight() > 2000, "{}", file(0).weight());
        let cache = FileCache::default();
        let manifest: Arc<Vec<Arc<FileInfo>>> = Arc::new((0..1000).map(|i| Arc::new(file(i))).collect());
        let weight: usize = manifest.iter().map(|f| f.weight()).sum();
        for m in 0..100 {
            cache.manifests.lock().put(format!("m{m}"), manifest.clone(), weight, CACHE_LIMIT, MANIFEST_CACHE_BYTES);
            let held = cache.manifests.lock();
            assert!(held.bytes <= MANIFEST_CACHE_BYTES, "{} bytes", held.bytes);
        }
        assert!(cache.manifests.lock().map.len() < 100, "evicted by bytes, not by count");
    }

    /// A record read twice counts once, in sequence order whatever order the files were read
    /// in; two different records under one sequence number are `Corrupt`.
    #[test]
    fn records_are_one_per_sequence_number() {
        let o = ObjectId::new("o").expect("id");
        let files = ["data/a.parquet".to_string(), "data/b.parquet".to_string()];
        let rs = vec![(record(3, "c"), 0), (record(1, "a"), 1), (record(3, "c"), 1), (record(2, "b"), 0)];
        let rs = one_per_seq(rs, &files, &o).expect("duplicates of one record");
        assert_eq!(rs.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        let rs = vec![(record(2, "b"), 0), (record(2, "x"), 1)];
        let e = one_per_seq(rs, &files, &o).expect_err("two records, one seq");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{e}");
        let msg = e.to_string();
        assert!(msg.contains("data/a.parquet") && msg.contains("data/b.parquet"), "names both files: {msg}");
        let rs = vec![(record(2, "b"), 1), (record(2, "x"), 1)];
        let e = one_per_seq(rs, &files, &o).expect_err("two records, one seq, one file");
        assert!(e.to_string().contains("both in data file data/b.parquet"), "{e}");
    }

    #[test]
    fn a_full_cache_drops_one_entry_not_all() {
        let m = parking_lot::Mutex::new(HashMap::new());
        for i in 0..10 {
            put_bounded_to(&m, format!("k{i}"), i, 4);
        }
        assert_eq!(m.lock().len(), 4);
        assert_eq!(m.lock().get("k9"), Some(&9), "the newest is kept");
        put_bounded_to(&m, "k9".to_string(), 99, 4);
        assert_eq!(m.lock().len(), 4, "replacing a key evicts nothing");
    }

    use super::*;

    #[test]
    fn bloom_cache_stays_within_its_byte_bound() {
        let mut c = BloomCache::default();
        let one = Arc::new(Sbbf::new_with_num_of_bytes(1 << 20));
        let counted = |c: &BloomCache| -> usize { c.map.keys().map(|k| (1 << 20) + k.0.len() + ENTRY_OVERHEAD).sum() };
        for i in 0..200 {
            c.put((format!("f{i}"), 0, 0), one.clone());
            assert!(c.bytes <= BLOOM_CACHE_BYTES, "{} bytes cached", c.bytes);
            assert_eq!(c.bytes, counted(&c));
        }
        assert!(c.get(&("f199".to_string(), 0, 0)).is_some(), "the newest filter survives eviction");
        c.put(("f199".to_string(), 0, 0), one);
        assert_eq!(c.bytes, counted(&c), "re-inserting a key does not count it twice");
        // Many one-block filters under long paths (dotdo folds filters of a few keys to one
        // block): their keys count too, so the bound holds for what the entries really hold.
        let mut c = BloomCache::default();
        let small = Arc::new(Sbbf::new_with_num_of_bytes(32));
        let dir = "s3://bucket/warehouse/app/changes/data/do_id_bucket=7/00000-0-0a1b2c3d-4e5f-6789-abcd-ef0123456789";
        for i in 0..1000 {
            c.put((format!("{dir}-{i:06}.parquet"), i % 4, 0), small.clone());
        }
        let held: usize = c.map.keys().map(|k| 32 + k.0.len() + ENTRY_OVERHEAD).sum();
        assert_eq!(c.bytes, held, "each entry counts its key and slot, not only its 32-byte filter");
        assert!(c.bytes > 1000 * 200, "{} bytes counted", c.bytes);
        // A filter larger than the whole cache is not kept, nor does it empty the cache.
        let before = c.map.len();
        c.put(("huge".to_string(), 0, 0), Arc::new(Sbbf::new_with_num_of_bytes(BLOOM_CACHE_BYTES)));
        assert!(c.bytes <= BLOOM_CACHE_BYTES && c.get(&("huge".to_string(), 0, 0)).is_none(), "{} bytes", c.bytes);
        assert_eq!(c.map.len(), before, "the cached filters stay");
    }

    #[test]
    fn list_cache_stays_within_its_manifest_bound() {
        let one = ManifestFile {
            manifest_path: "m".into(),
            manifest_length: 1,
            partition_spec_id: 0,
            content: iceberg::spec::ManifestContentType::Data,
            sequence_number: 1,
            min_sequence_number: 1,
            added_snapshot_id: 1,
            added_files_count: Some(1),
            existing_files_count: Some(0),
            deleted_files_count: Some(0),
            added_rows_count: Some(1),
            existing_rows_count: Some(0),
            deleted_rows_count: Some(0),
            partitions: None,
            key_metadata: None,
            first_row_id: None,
        };
        let lists = parking_lot::Mutex::new(HashMap::new());
        // A streaming table: list i holds i manifests.
        for i in 1..2_000usize {
            put_list(&lists, format!("snap-{i}"), Arc::new(vec![one.clone(); i]));
            let held: usize = lists.lock().values().map(|l| l.len()).sum();
            assert!(held <= LIST_CACHE_MANIFESTS, "{held} manifests cached");
            assert!(lists.lock().contains_key(&format!("snap-{i}")), "the newest list survives eviction");
        }
        // A list longer than the bound alone is not cached, and the others stay.
        let before = lists.lock().len();
        put_list(&lists, "huge".into(), Arc::new(vec![one.clone(); LIST_CACHE_MANIFESTS + 1]));
        assert!(!lists.lock().contains_key("huge"));
        assert_eq!(lists.lock().len(), before, "the cached lists stay");
        // Manifests are cached by path and length: other bytes under one path are another entry.
        let other = ManifestFile { manifest_length: 2, ..one.clone() };
        assert_ne!(manifest_cache_key(&one), manifest_cache_key(&other));
    }

    #[test]
    fn key_filters_prune_by_bounds() {
        let f = Filter { key: Some("m".into()), ..Default::default() };
        assert!(f.key_overlaps("a", "z"));
        assert!(!f.key_overlaps("n", "z"));
        let r = Filter { range: Some(KeyRange::between("b", "d")), ..Default::default() };
        assert!(r.key_overlaps("a", "b"));
        assert!(!r.key_overlaps("d", "z"), "between's end is exclusive");
        assert!(Filter::default().key_overlaps("x", "y"));
    }
}
