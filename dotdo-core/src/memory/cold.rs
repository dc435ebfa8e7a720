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

/// One commit: its records (a "data file") and the cumulative watermarks after it.
#[derive(Debug)]
struct Snapshot {
    info: SnapshotInfo,
    file: Arc<Vec<ChangeRecord>>,
    watermarks: Arc<BTreeMap<ObjectId, Watermark>>,
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
    snapshots: Arc<Mutex<Vec<Snapshot>>>,
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
        MemoryColdStore { snapshots: Arc::new(Mutex::new(Vec::new())), clock }
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
    fn records_of(snaps: &[Snapshot], idx: Option<usize>, object: &ObjectId) -> (Vec<ChangeRecord>, QueryStats) {
        let mut stats = QueryStats::default();
        let mut out = Vec::new();
        if let Some(i) = idx {
            stats.snapshot = Some(snaps[i].info.id);
            for s in &snaps[..=i] {
                stats.files_total += 1;
                let mut opened = false;
                for r in s.file.iter().filter(|r| &r.object == object) {
                    opened = true;
                    stats.bytes_read += r.value.len() as u64;
                    out.push(r.clone());
                }
                if opened {
                    stats.files_opened += 1;
                    stats.row_groups_read += 1;
                } else {
                    stats.pruned_by_min_max += 1;
                }
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
        let mut snaps = self.snapshots.lock();
        let prev: Arc<BTreeMap<ObjectId, Watermark>> = snaps.last().map(|s| s.watermarks.clone()).unwrap_or_default();
        let mut next = (*prev).clone();
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
        let mut watermarks: BTreeMap<ObjectId, Watermark> = BTreeMap::new();
        for oc in &batch.objects {
            if let Some(w) = next.get(&oc.object) {
                watermarks.insert(oc.object.clone(), *w);
            }
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
        snaps.push(Snapshot {
            info: SnapshotInfo { id, parent, committed_at, added_records: written },
            file: Arc::new(new_records),
            watermarks: Arc::new(next),
        });
        Ok(ColdCommit { snapshot: Some(id), records_written: written, records_skipped: skipped, watermarks })
    }

    async fn watermark(&self, object: &ObjectId) -> Result<Watermark> {
        let snaps = self.snapshots.lock();
        Ok(snaps.last().and_then(|s| s.watermarks.get(object).copied()).unwrap_or_default())
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(self.snapshots.lock().iter().map(|s| s.info.clone()).collect())
    }

    /// One read under the lock: the newest snapshot and the object's watermark in it.
    async fn head(&self, object: &ObjectId) -> Result<(Option<crate::SnapshotId>, Watermark)> {
        let snaps = self.snapshots.lock();
        let last = snaps.last();
        Ok((last.map(|s| s.info.id), last.and_then(|s| s.watermarks.get(object).copied()).unwrap_or_default()))
    }

    async fn load_state(&self, object: &ObjectId, as_of: AsOf) -> Result<ColdState> {
        let snaps = self.snapshots.lock();
        let idx = Self::resolve(&snaps, as_of)?;
        let (records, stats) = Self::records_of(&snaps, idx, object);
        let (entries, through) = fold_changes(&records);
        Ok(ColdState { entries, through, snapshot: stats.snapshot })
    }

    async fn read_changes(&self, object: &ObjectId, after: Seq, as_of: AsOf) -> Result<Vec<ChangeRecord>> {
        let snaps = self.snapshots.lock();
        let idx = Self::resolve(&snaps, as_of)?;
        let (mut records, _) = Self::records_of(&snaps, idx, object);
        records.retain(|r| r.seq > after);
        Ok(records)
    }
}

#[async_trait]
impl IndexAccelerator for MemoryColdStore {
    async fn lookup(&self, object: &ObjectId, key: &str, as_of: AsOf) -> Result<Lookup> {
        crate::ids::validate_key(key)?;
        let sw = Stopwatch::start(self.clock.clone());
        let snaps = self.snapshots.lock();
        let idx = Self::resolve(&snaps, as_of)?;
        let (mut records, mut stats) = Self::records_of(&snaps, idx, object);
        records.retain(|r| r.key == key);
        let value = latest_versions(records).into_values().next().filter(|v| v.op == crate::Op::Put);
        stats.elapsed = sw.elapsed();
        Ok(Lookup { value, stats })
    }

    async fn scan(&self, query: ScanQuery) -> Result<Scan> {
        let sw = Stopwatch::start(self.clock.clone());
        let snaps = self.snapshots.lock();
        let idx = Self::resolve(&snaps, query.as_of)?;
        let (mut records, mut stats) = Self::records_of(&snaps, idx, &query.object);
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
