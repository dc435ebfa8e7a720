//! The [`ColdSink`] contract: idempotent, fenced appends of change records to cold storage, with
//! a durable per-object watermark.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::ids::{FencingToken, ObjectId};
use crate::record::{ChangeRecord, Entry, Seq};
use crate::time::Timestamp;

/// Identifier of a cold snapshot (an Iceberg snapshot id for the Iceberg backend).
pub type SnapshotId = i64;

/// Which version of cold state to read. `Latest` on a table without snapshots, and a
/// `Timestamp` before the first snapshot, read as empty (no entries, `through` 0), not `NotFound`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum AsOf {
    /// The latest committed snapshot.
    #[default]
    Latest,
    /// A given snapshot.
    Snapshot(SnapshotId),
    /// The latest snapshot committed at or before the timestamp, on the chain of the current
    /// head (walking back through its parents). After another engine rolled the table back, a
    /// time when an abandoned snapshot was current reads the head's ancestor of that time, where
    /// engines that read the table's snapshot log (Spark, PyIceberg) may pick the abandoned one.
    Timestamp(Timestamp),
}

/// How far an object's changes are durable in cold storage.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Watermark {
    /// Every change with `seq <= through` is durably in cold storage (0: none).
    pub through: Seq,
    /// The highest committer token seen for the object in cold storage.
    pub token: FencingToken,
}

/// The changes of one object in a [`ColdBatch`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ObjectChanges {
    /// The object.
    pub object: ObjectId,
    /// The committer's current fencing token (not necessarily the token each record was written
    /// under: a new holder drains what an old holder wrote).
    pub token: FencingToken,
    /// Records of this object, strictly increasing `seq` without gaps.
    pub records: Vec<ChangeRecord>,
}

/// A set of changes committed to cold storage as one atomic commit (one snapshot).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ColdBatch {
    /// Per-object changes; each object at most once.
    pub objects: Vec<ObjectChanges>,
}

impl ColdBatch {
    /// A batch of one object's changes.
    pub fn single(object: ObjectId, token: FencingToken, records: Vec<ChangeRecord>) -> Self {
        ColdBatch { objects: vec![ObjectChanges { object, token, records }] }
    }

    /// Total number of records.
    pub fn record_count(&self) -> usize {
        self.objects.iter().map(|o| o.records.len()).sum()
    }

    /// Check the structural rules: records belong to their object, sequence numbers strictly
    /// increase without gaps, each object appears once, tokens are not `NONE`.
    pub fn validate(&self) -> Result<()> {
        let mut seen = std::collections::BTreeSet::new();
        for oc in &self.objects {
            if !seen.insert(&oc.object) {
                return Err(Error::invalid(format!("object {} appears twice in one cold batch", oc.object)));
            }
            oc.token.validate().map_err(|e| e.context(format!("cold batch of {}", oc.object)))?;
            for (i, r) in oc.records.iter().enumerate() {
                if r.object != oc.object {
                    return Err(Error::invalid(format!("record of {} in the changes of {}", r.object, oc.object)));
                }
                if i > 0 && r.seq != oc.records[i - 1].seq + 1 {
                    return Err(Error::invalid(format!(
                        "records of {} are not contiguous: seq {} follows {}",
                        oc.object,
                        r.seq,
                        oc.records[i - 1].seq
                    )));
                }
                if r.seq == 0 {
                    return Err(Error::invalid("sequence numbers start at 1"));
                }
                crate::record::validate_seq(r.seq, "record seq")?;
            }
        }
        Ok(())
    }

    /// [`validate`](Self::validate), and every record's own fields
    /// ([`ChangeRecord::validate`]): what a cold sink must refuse before committing anything
    /// (a record it stored could never be restored into a hot store).
    pub fn validate_records(&self) -> Result<()> {
        self.validate()?;
        self.objects.iter().flat_map(|o| &o.records).try_for_each(ChangeRecord::validate)
    }
}

/// The outcome of [`ColdSink::append`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ColdCommit {
    /// The snapshot the commit created; `None` if everything was already covered (a replay).
    pub snapshot: Option<SnapshotId>,
    /// Records newly written by this commit.
    pub records_written: u64,
    /// Records skipped because cold storage already had them.
    pub records_skipped: u64,
    /// The durable watermarks after the call, per object of the batch (for a call that commits
    /// nothing, the ones before it: a higher token of a pure replay is not recorded).
    pub watermarks: BTreeMap<ObjectId, Watermark>,
}

/// Metadata of a cold snapshot.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SnapshotInfo {
    /// The snapshot id.
    pub id: SnapshotId,
    /// Parent snapshot, if any.
    pub parent: Option<SnapshotId>,
    /// Commit time: the time [`AsOf::Timestamp`] reads go by (a sink may report the latest
    /// commit time on the snapshot's chain, when another writer's clock stamped a snapshot before
    /// its parent).
    pub committed_at: Timestamp,
    /// Number of records the commit added.
    pub added_records: u64,
}

/// An object's state as recovered from cold storage.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ColdState {
    /// Live entries (latest put per key, deleted keys omitted), in key order.
    pub entries: Vec<Entry>,
    /// The highest sequence number the state reflects.
    pub through: Seq,
    /// The snapshot read.
    pub snapshot: Option<SnapshotId>,
}

/// Cold storage for change records.
///
/// # Contract
///
/// * **Atomic.** One [`append`](ColdSink::append) is one commit: all of its new records become
///   visible together in one new snapshot, or none do.
/// * **Exactly once.** The sink keeps a durable [`Watermark`] per object. Records with
///   `seq <= watermark.through` are skipped (reported in `records_skipped`), so a retry or a crash
///   replay never duplicates rows; the first new record must be `watermark.through + 1`, else
///   `InvalidInput` (a gap would lose rows). A batch with nothing new creates no snapshot.
/// * **Fencing.** An object's committer token must be `>=` the highest committer token recorded
///   for it, else `Fenced` and nothing of the batch is committed.
/// * **Valid records.** A batch that breaks [`ColdBatch::validate_records`] (a bad key, value,
///   type name or token in any record) is refused with the error that check gives
///   (`LimitExceeded` for a key or value over its limit, `InvalidInput` otherwise, as in a hot
///   store; a sink may refuse it for a stale committer token or a gap first), and nothing of it
///   is committed: a record stored could never be restored into a hot store.
/// * **Unknown outcomes.** If a commit's outcome is unknown the sink resolves it by reading back
///   the watermark before retrying, or returns `AmbiguousOutcome`; a caller that gets
///   `AmbiguousOutcome` (or any error) may call `append` again with the same batch safely.
/// * **Durability.** `Ok` means the records are durable in the store and visible to reads.
/// * **Reads.** [`load_state`](ColdSink::load_state) applies changes in sequence order (latest put
///   per key wins, deletes remove), whatever their timestamps (the changes of one write share
///   one, and a holder whose clock is behind stamps later changes with earlier times). Reading an expired or unknown snapshot is `NotFound`.
/// * **Errors.** Unreachable store → `Unavailable` (retryable); missing or damaged data/metadata
///   file → `Corrupt` naming the file.
#[async_trait]
pub trait ColdSink: Send + Sync + Debug + 'static {
    /// Commit `batch` (see the contract).
    async fn append(&self, batch: ColdBatch) -> Result<ColdCommit>;

    /// The durable watermark of `object` (default if unknown).
    async fn watermark(&self, object: &ObjectId) -> Result<Watermark>;

    /// The durable watermarks of `objects`, in their order, each as
    /// [`watermark`](ColdSink::watermark) gives it. A sink that can reads them all from one
    /// snapshot; the default asks one object at a time.
    async fn watermarks(&self, objects: &[ObjectId]) -> Result<Vec<Watermark>> {
        let mut out = Vec::with_capacity(objects.len());
        for o in objects {
            out.push(self.watermark(o).await?);
        }
        Ok(out)
    }

    /// Snapshots, oldest first.
    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>>;

    /// The newest snapshot and `object`'s watermark in it, as one answer: a lazy restore pins
    /// the snapshot and serves reads there as the object's state through the watermark (and
    /// re-pins through this when the pinned snapshot expires). A sink
    /// should answer both from one read of its table (dotdo-iceberg and
    /// [`MemoryColdStore`](crate::MemoryColdStore) do; a wrapper should forward this). The default is
    /// [`head_by_reads`]: it reads the object's whole state at the snapshot to check it, on
    /// every lazy activation and re-pin.
    async fn head(&self, object: &ObjectId) -> Result<(Option<SnapshotId>, Watermark)> {
        head_by_reads(self, object).await
    }

    /// An object's state as of a snapshot.
    async fn load_state(&self, object: &ObjectId, as_of: AsOf) -> Result<ColdState>;

    /// An object's change records with `seq > after`, in order, as of a snapshot.
    async fn read_changes(&self, object: &ObjectId, after: Seq, as_of: AsOf) -> Result<Vec<ChangeRecord>>;

    /// An object's change records with `after < seq <= through`, in order, as of a snapshot
    /// (empty if `through <= after`). The default reads every change after `after` and drops
    /// the rest; a sink that can skips them while reading, so that a few records are read
    /// without holding an object's whole tail in memory.
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
        let mut records = self.read_changes(object, after, as_of).await?;
        records.retain(|r| r.seq <= through);
        Ok(records)
    }
}

/// [`ColdSink::head`] from separate reads: the watermark, the snapshot list, then the object's
/// state at the newest snapshot, whose `through` must equal the watermark (one of the reads may
/// have answered an older table, as a lagging catalog replica may; a check of the changes around
/// the watermark alone is fooled by changes collapsed away). A mismatch, or the snapshot expiring
/// meanwhile, is `Unavailable` (retryable). Costs a read of the object's whole state.
pub async fn head_by_reads<S: ColdSink + ?Sized>(
    sink: &S,
    object: &ObjectId,
) -> Result<(Option<SnapshotId>, Watermark)> {
    let wm = sink.watermark(object).await?;
    let snapshot = sink.snapshots().await?.last().map(|s| s.id);
    let moved = |at: Seq| {
        Error::unavailable(format!(
            "{object}: the cold store's newest snapshot ({snapshot:?}) holds the object through seq {at}, its \
             watermark read just before says {}: one of the reads answered an older table; retry",
            wm.through
        ))
    };
    let Some(s) = snapshot else {
        return if wm.through == 0 { Ok((None, wm)) } else { Err(moved(0)) };
    };
    let at = sink.load_state(object, AsOf::Snapshot(s)).await.map_err(|e| {
        if e.kind() == &crate::ErrorKind::NotFound {
            // Expired since it was listed (a table expiring aggressively): ask again.
            Error::unavailable(format!(
                "{object}: the cold store's newest snapshot {s} expired while it was read; retry"
            ))
            .with_source(e)
        } else {
            e
        }
    })?;
    if at.through != wm.through {
        return Err(moved(at.through));
    }
    Ok((snapshot, wm))
}

#[async_trait]
impl<T: ColdSink + ?Sized> ColdSink for Arc<T> {
    async fn append(&self, batch: ColdBatch) -> Result<ColdCommit> {
        (**self).append(batch).await
    }
    async fn watermark(&self, object: &ObjectId) -> Result<Watermark> {
        (**self).watermark(object).await
    }
    async fn watermarks(&self, objects: &[ObjectId]) -> Result<Vec<Watermark>> {
        (**self).watermarks(objects).await
    }
    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        (**self).snapshots().await
    }
    async fn head(&self, object: &ObjectId) -> Result<(Option<SnapshotId>, Watermark)> {
        (**self).head(object).await
    }
    async fn load_state(&self, object: &ObjectId, as_of: AsOf) -> Result<ColdState> {
        (**self).load_state(object, as_of).await
    }
    async fn read_changes(&self, object: &ObjectId, after: Seq, as_of: AsOf) -> Result<Vec<ChangeRecord>> {
        (**self).read_changes(object, after, as_of).await
    }
    async fn read_changes_through(
        &self,
        object: &ObjectId,
        after: Seq,
        through: Seq,
        as_of: AsOf,
    ) -> Result<Vec<ChangeRecord>> {
        (**self).read_changes_through(object, after, through, as_of).await
    }
}

/// Fold ordered change records into live entries (latest put per key; deletes remove).
pub fn fold_changes<'a>(records: impl IntoIterator<Item = &'a ChangeRecord>) -> (Vec<Entry>, Seq) {
    let mut map: BTreeMap<&str, (Seq, Option<Entry>)> = BTreeMap::new();
    let mut through = 0;
    for r in records {
        through = through.max(r.seq);
        let slot = map.entry(r.key.as_str()).or_insert((0, None));
        if slot.0 > r.seq {
            continue;
        }
        *slot = match r.op {
            crate::record::Op::Put => (r.seq, Some(Entry { key: r.key.clone(), value: r.value.clone(), seq: r.seq })),
            crate::record::Op::Delete => (r.seq, None),
        };
    }
    (map.into_values().filter_map(|(_, e)| e).collect(), through)
}
