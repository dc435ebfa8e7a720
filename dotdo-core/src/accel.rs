//! The [`IndexAccelerator`] contract: point lookups and scans over cold state that open as few
//! files as possible, with an explanation of what was pruned.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::cold::{AsOf, SnapshotId};
use crate::error::Result;
use crate::ids::ObjectId;
use crate::record::{ChangeRecord, KeyRange, Op, Seq};
use crate::time::Timestamp;

/// What a query did: how many files the snapshot had, how many each pruning layer removed, and
/// what was actually read.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct QueryStats {
    /// The snapshot the query read (the one an `AsOf` resolved to; `None` when it selects none:
    /// a table without snapshots, or a time before the first commit).
    pub snapshot: Option<SnapshotId>,
    /// Data files in the snapshot.
    pub files_total: u64,
    /// Files pruned by partition values.
    pub pruned_by_partition: u64,
    /// Files pruned by column lower/upper bounds.
    pub pruned_by_min_max: u64,
    /// Files pruned by bloom filters.
    pub pruned_by_bloom: u64,
    /// Files pruned by a key index.
    pub pruned_by_key_index: u64,
    /// Data files opened.
    pub files_opened: u64,
    /// Row groups read.
    pub row_groups_read: u64,
    /// Bytes read from storage.
    pub bytes_read: u64,
    /// Wall time of the query.
    pub elapsed: Duration,
}

/// A version of a key as found in cold storage.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct VersionedValue {
    /// The key.
    pub key: String,
    /// The value (empty for a delete).
    pub value: Bytes,
    /// Put or delete.
    pub op: Op,
    /// The change's sequence number.
    pub seq: Seq,
    /// The change's timestamp.
    pub timestamp: Timestamp,
    /// The object's type name.
    pub type_name: String,
}

/// The answer to a point lookup.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Lookup {
    /// The latest version of the key as of the snapshot, if the key is live (a delete yields
    /// `None`).
    pub value: Option<VersionedValue>,
    /// What the lookup did.
    pub stats: QueryStats,
}

/// A scan over one object's cold state.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ScanQuery {
    /// The object.
    pub object: ObjectId,
    /// Keys to include.
    pub keys: KeyRange,
    /// Only entries of this type name, if given.
    pub type_name: Option<String>,
    /// Only entries whose latest change's timestamp is in `[from, to)`, if given.
    pub time_range: Option<(Timestamp, Timestamp)>,
    /// Which snapshot to read.
    pub as_of: AsOf,
    /// At most this many entries (in key order). It bounds the answer, not the work: every
    /// version of every key in `keys` is read and folded first (narrow `keys` to read less).
    pub limit: Option<usize>,
}

impl ScanQuery {
    /// All live keys of `object`, latest snapshot.
    pub fn object(object: ObjectId) -> Self {
        ScanQuery { object, keys: KeyRange::all(), type_name: None, time_range: None, as_of: AsOf::Latest, limit: None }
    }

    /// Restrict to a key range.
    pub fn keys(mut self, keys: KeyRange) -> Self {
        self.keys = keys;
        self
    }

    /// Read an older snapshot.
    pub fn as_of(mut self, as_of: AsOf) -> Self {
        self.as_of = as_of;
        self
    }
}

/// The answer to a scan.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Scan {
    /// Latest live version of each matching key, in key order.
    pub entries: Vec<VersionedValue>,
    /// What the scan did.
    pub stats: QueryStats,
}

/// Fast reads of cold state.
///
/// # Contract
///
/// * **Same answers as a full scan.** A lookup returns exactly what folding all of the object's
///   records of the snapshot in sequence order gives for that key (latest change wins, a delete
///   means absent); a scan returns the latest live version of each key in the range that
///   matches the filters (filters apply to that latest version). Pruning may skip work, never
///   results: no false negatives. The checks of damage a full read of the object makes (two
///   different records with one sequence number, a row missing a required value) cover the rows
///   a lookup reads: a lookup of one key may answer where a full read of the object finds damage
///   among other keys' rows and is `Corrupt`.
/// * **Snapshots.** `AsOf` selects the snapshot; an unknown or expired snapshot is `NotFound`
///   (a store that has not seen the expiry yet may still answer with that snapshot's data, a
///   snapshot never changing: dotdo-iceberg with `refresh_reads` off, until a cleanup deletes a
///   file the read needs).
/// * **Stats.** Every answer carries [`QueryStats`] describing what was pruned and read.
#[async_trait]
pub trait IndexAccelerator: Send + Sync + Debug + 'static {
    /// The latest version of `key` of `object` as of a snapshot.
    async fn lookup(&self, object: &ObjectId, key: &str, as_of: AsOf) -> Result<Lookup>;

    /// Entries of one object matching `query`.
    async fn scan(&self, query: ScanQuery) -> Result<Scan>;
}

#[async_trait]
impl<T: IndexAccelerator + ?Sized> IndexAccelerator for Arc<T> {
    async fn lookup(&self, object: &ObjectId, key: &str, as_of: AsOf) -> Result<Lookup> {
        (**self).lookup(object, key, as_of).await
    }
    async fn scan(&self, query: ScanQuery) -> Result<Scan> {
        (**self).scan(query).await
    }
}

/// The latest version of each key among `records` (any order; deletes included), keyed by key.
/// Accelerators fold what they read with this, so every backend answers like a full scan. Of
/// two records of one key with the same sequence number (which no valid log holds) the later
/// one read wins, as in [`fold_changes`](crate::cold::fold_changes).
pub fn latest_versions(records: impl IntoIterator<Item = ChangeRecord>) -> BTreeMap<String, VersionedValue> {
    let mut latest: BTreeMap<String, VersionedValue> = BTreeMap::new();
    for r in records {
        if latest.get(&r.key).is_none_or(|v| v.seq <= r.seq) {
            latest.insert(
                r.key.clone(),
                VersionedValue {
                    key: r.key,
                    value: r.value,
                    op: r.op,
                    seq: r.seq,
                    timestamp: r.timestamp,
                    type_name: r.type_name,
                },
            );
        }
    }
    latest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FencingToken, ObjectId, Op, Timestamp};

    fn rec(seq: u64, key: &str, value: &str) -> ChangeRecord {
        ChangeRecord {
            object: ObjectId::new("o").expect("id"),
            seq,
            key: key.into(),
            op: Op::Put,
            value: bytes::Bytes::from(value.to_string()),
            token: FencingToken::new(1),
            timestamp: Timestamp::EPOCH,
            type_name: "T".into(),
        }
    }

    /// An accelerator's fold and a full read's fold agree, also on two records of one key with
    /// one sequence number (the later one read wins in both; the accelerator's kept the first).
    #[test]
    fn latest_versions_agree_with_fold_changes_on_ties() {
        let records = vec![rec(1, "a", "x"), rec(2, "a", "first"), rec(2, "a", "second"), rec(1, "b", "y")];
        let (entries, _) = crate::cold::fold_changes(&records);
        let latest = latest_versions(records.clone());
        let folded: Vec<(String, bytes::Bytes)> = entries.into_iter().map(|e| (e.key, e.value)).collect();
        let accel: Vec<(String, bytes::Bytes)> = latest.into_values().map(|v| (v.key, v.value)).collect();
        assert_eq!(accel, folded);
        assert_eq!(accel[0].1, "second");
    }
}
