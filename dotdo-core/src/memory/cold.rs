use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::accel::{latest_versions, IndexAccelerator, Lookup, QueryStats, Scan, ScanQuery, VersionedValue};
use crate::cold::{fold_changes, AsOf, ColdBatch, ColdCommit, ColdSink, ColdState, SnapshotInfo, Watermark};
use crate::error::{Error, ErrorKind, Result};
use crate::ids::ObjectId;
use crate::record::{ChangeRecord, Seq};
use crate::time::{Clock, Stopwatch, SystemClock};

/// One commit: its records (a "data file").
#[derive(Debug)]
struct Snapshot {
    info: SnapshotInfo,
    file: Arc<Vec<ChangeRecord>>,
}

/// The commits, oldest first, and every object's watermark after the newest (only the newest
/// snapshot's are ever read: a copy per snapshot cost each append a pass over every object, and
/// memory growing with commits times objects).
#[derive(Debug, Default)]
struct Table {
    snapshots: Vec<Snapshot>,
    watermarks: BTreeMap<ObjectId, Watermark>,
    /// The snapshots (indices, ascending) whose file holds records of each object: a read of
    /// one object opens those only, as a reader of a partitioned table would.
    holding: BTreeMap<ObjectId, Vec<usize>>,
}

/// In-memory [`ColdSink`] + [`IndexAccelerator`] reference backend: every commit is one immutable
/// snapshot holding one "file" of records. Cheap to clone; clones share state.
///
/// ```
/// # futures::executor::block_on(async {
/// use dotdo_core::{AsOf, ColdBatch, ColdSink, FencingToken, MemoryColdStore, ObjectId};
///
/// let cold = MemoryColdStore::new();
/// let obj = ObjectId::new("user:1")?;
/// let commit = cold.append(ColdBatch::single(obj.clone(), FencingToken::new(1), vec![])).await?;
/// assert_eq!(commit.snapshot, None); // nothing new, no snapshot
/// assert_eq!(cold.load_state(&obj, AsOf::Latest).await?.entries.len(), 0);
/// # Ok::<(), dotdo_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct MemoryColdStore {
    table: Arc<Mutex<Table>>,
    clock: Arc<dyn Clock>,
}

impl Default for MemoryColdStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryColdStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock::new()))
    }

    /// An empty store reading time from `clock`.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        MemoryColdStore { table: Arc::new(Mutex::new(Table::default())), clock }
    }

    /// The index of the snapshot selected by `as_of`, `None` for an empty table.
    fn resolve(snaps: &[Snapshot], as_of: AsOf) -> Result<Option<usize>> {
        match as_of {
            AsOf::Latest => Ok(snaps.len().checked_sub(1)),
            AsOf::Snapshot(id) => snaps
                .iter()
                .position(|s| s.info.id == id)
                .map(Some)
                .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("snapshot {id} does not exist"))),
            AsOf::Timestamp(ts) => Ok(snaps.iter().rposition(|s| s.info.committed_at <= ts)),
        }
    }

    /// All records of `object` visible at snapshot index `idx`, in sequence order, and the number
    /// of files that hold any.
    fn records_of(table: &Table, idx: Option<usize>, object: &ObjectId) -> (Vec<ChangeRecord>, QueryStats) {
        let mut stats = QueryStats::default();
        let mut out = Vec::new();
        if let Some(i) = idx {
            stats.snapshot = Some(table.snapshots[i].info.id);
            let holding = table.holding.get(object).map_or(&[][..], |h| &h[..h.partition_point(|&k| k <= i)]);
            let opened = holding.len() as u64;
            stats.files_total = i as u64 + 1;
            stats.files_opened = opened;
            stats.row_groups_read = opened;
            stats.pruned_by_min_max = stats.files_total - opened;
            for r in holding.iter().flat_map(|&k| table.snapshots[k].file.iter()).filter(|r| &r.object == object) {
                stats.bytes_read += r.value.len() as u64;
                out.push(r.clone());
            }
        }
        out.sort_by_key(|r| r.seq);
        (out, stats)
    }
}

#[async_trait]
impl ColdSink for MemoryColdStore {
    async fn append(&self, batch: ColdBatch) -> Result<ColdCommit> {
        batch.validate_records()?;
        let mut table = self.table.lock();
        let Table { snapshots: snaps, watermarks: prev, holding } = &mut *table;
        // The batch's objects' watermarks after it (installed only if it commits).
        let mut next: BTreeMap<ObjectId, Watermark> = BTreeMap::new();
        let mut new_records = Vec::new();
        let mut skipped = 0u64;
        for oc in &batch.objects {
            let wm = prev.get(&oc.object).copied().unwrap_or_default();
            if oc.token < wm.token {
                return Err(Error::fenced(&oc.object, oc.token, wm.token));
            }
            let fresh: Vec<&ChangeRecord> = oc.records.iter().filter(|r| r.seq > wm.through).collect();
            skipped += (oc.records.len() - fresh.len()) as u64;
            if let Some(first) = fresh.first() {
                if first.seq != wm.through + 1 {
                    return Err(Error::invalid(format!(
                        "cold batch for {} starts at seq {} but cold storage has seq {}: the records in between would be lost",
                        oc.object, first.seq, wm.through
                    )));
                }
            }
            let through = fresh.last().map_or(wm.through, |r| r.seq);
            next.insert(oc.object.clone(), Watermark { through, token: oc.token.max(wm.token) });
            new_records.extend(fresh.into_iter().cloned());
        }
        if new_records.is_empty() {
            // Nothing is committed, so nothing (a higher token included) becomes durable.
            let durable =
                batch.objects.iter().map(|oc| (oc.object.clone(), prev.get(&oc.object).copied().unwrap_or_default()));
            return Ok(ColdCommit {
                snapshot: None,
                records_written: 0,
                records_skipped: skipped,
                watermarks: durable.collect(),
            });
        }
        let id = snaps.last().map_or(1, |s| s.info.id + 1);
        let parent = snaps.last().map(|s| s.info.id);
        let committed_at = self.clock.now().max(snaps.last().map_or(crate::Timestamp::EPOCH, |s| s.info.committed_at));
        let written = new_records.len() as u64;
        let at = snaps.len();
        for o in new_records.iter().map(|r| &r.object).collect::<std::collections::BTreeSet<_>>() {
            holding.entry(o.clone()).or_default().push(at);
        }
        snaps.push(Snapshot {
            info: SnapshotInfo { id, parent, committed_at, added_records: written },
            file: Arc::new(new_records),
        });
        prev.extend(next.iter().map(|(o, w)| (o.clone(), *w)));
        Ok(ColdCommit { snapshot: Some(id), records_written: written, records_skipped: skipped, watermarks: next })
    }

    async fn watermark(&self, object: &ObjectId) -> Result<Watermark> {
        Ok(self.table.lock().watermarks.get(object).copied().unwrap_or_default())
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(self.table.lock().snapshots.iter().map(|s| s.info.clone()).collect())
    }

    /// One read under the lock: the newest snapshot and the object's watermark in it.
    async fn head(&self, object: &ObjectId) -> Result<(Option<crate::SnapshotId>, Watermark)> {
        let table = self.table.lock();
        Ok((table.snapshots.last().map(|s| s.info.id), table.watermarks.get(object).copied().unwrap_or_default()))
    }

    async fn load_state(&self, object: &ObjectId, as_of: AsOf) -> Result<ColdState> {
        let table = self.table.lock();
        let snaps = &table.snapshots;
        let idx = Self::resolve(snaps, as_of)?;
        let (records, stats) = Self::records_of(&table, idx, object);
        let (entries, through) = fold_changes(&records);
        Ok(ColdState { entries, through, snapshot: stats.snapshot })
    }

    async fn read_changes(&self, object: &ObjectId, after: Seq, as_of: AsOf) -> Result<Vec<ChangeRecord>> {
        let table = self.table.lock();
        let snaps = &table.snapshots;
        let idx = Self::resolve(snaps, as_of)?;
        let (mut records, _) = Self::records_of(&table, idx, object);
        records.retain(|r| r.seq > after);
        Ok(records)
    }
}

#[async_trait]
impl IndexAccelerator for MemoryColdStore {
    async fn lookup(&self, object: &ObjectId, key: &str, as_of: AsOf) -> Result<Lookup> {
        crate::ids::validate_key(key)?;
        let sw = Stopwatch::start(self.clock.clone());
        let table = self.table.lock();
        let snaps = &table.snapshots;
        let idx = Self::resolve(snaps, as_of)?;
        let (mut records, mut stats) = Self::records_of(&table, idx, object);
        records.retain(|r| r.key == key);
        let value = latest_versions(records).into_values().next().filter(|v| v.op == crate::Op::Put);
        stats.elapsed = sw.elapsed();
        Ok(Lookup { value, stats })
    }

    async fn scan(&self, query: ScanQuery) -> Result<Scan> {
        let sw = Stopwatch::start(self.clock.clone());
        let table = self.table.lock();
        let snaps = &table.snapshots;
        let idx = Self::resolve(snaps, query.as_of)?;
        let (mut records, mut stats) = Self::records_of(&table, idx, &query.object);
        records.retain(|r| query.keys.contains(&r.key));
        let mut entries: Vec<VersionedValue> = latest_versions(records)
            .into_values()
            .filter(|v| v.op == crate::Op::Put)
            .filter(|v| query.type_name.as_ref().is_none_or(|t| &v.type_name == t))
            .filter(|v| query.time_range.is_none_or(|(from, to)| v.timestamp >= from && v.timestamp < to))
            .collect();
        if let Some(n) = query.limit {
            entries.truncate(n);
        }
        stats.elapsed = sw.elapsed();
        Ok(Scan { entries, stats })
    }
}
