//! What dotdo records in each Iceberg snapshot summary.
//!
//! * `dotdo.watermarks`: per-object watermarks after the commit, compact JSON
//!   `{"<do_id>":[through,token],…}`, for every object changed since the checkpoint;
//! * `dotdo.watermarks-checkpoint`: the location of an immutable checkpoint file (same JSON)
//!   holding the watermarks of every other object. The full map is checkpoint + inline.
//!   [`ColdSink::watermark`](dotdo_core::ColdSink::watermark) reads the current snapshot (and
//!   at most its checkpoint, cached), so expiring old snapshots loses nothing, and the inline part
//!   stays within `Settings::watermark_checkpoint_objects` entries and about
//!   [`INLINE_WATERMARK_BYTES`] (64 KiB; 1,000 ids of 256 bytes would be 290 KB in every
//!   snapshot's summary, all of which the table metadata holds).
//! * `dotdo.commit-id`: a UUID per logical append, used to resolve a commit whose outcome is
//!   unknown (read back: is a snapshot with this id in the table?).
//! * `dotdo.committed-at-us`: commit time on the store's [`Clock`](dotdo_core::Clock), never
//!   earlier than the parent's; `AsOf::Timestamp` and `SnapshotInfo::committed_at` use it. Other
//!   engines' time travel uses Iceberg's own `timestamp-ms`, which is the wall clock: with the
//!   SQL catalog on a format-v2 table (dotdo's own commit path), dotdo stamps it with the same
//!   instant (in ms) when its clock is the wall clock, so both pick the same snapshot for a time
//!   (PyIceberg's `snapshot_as_of_timestamp` is tested). Through iceberg's own commit path (a
//!   REST or memory catalog, a format-v1 table), iceberg stamps `timestamp-ms` itself once the
//!   manifests are written, a few milliseconds later: for a time in between, dotdo picks the new
//!   snapshot and other engines its parent.
//!
//! * `dotdo.watermarks-carried`: how many bytes of inline watermarks the snapshots since the
//!   checkpoint have carried over from their parents (an estimate, see [`CARRIED`]).
//!
//! The inline part is bounded, so the table metadata (which holds every retained snapshot's
//! summary) stays small however many objects a table has; a new checkpoint file is written when
//! the inline part would exceed the bound. The inline parts repeated from snapshot to snapshot
//! are bounded too: once the snapshots since the checkpoint have carried over more than
//! [`INLINE_WATERMARK_BYTES`] (or, for a larger table, about the size of a new checkpoint file),
//! the next commit writes a checkpoint. Without it, one commit of a few hundred objects left
//! their watermarks in every later snapshot's summary until the next checkpoint, which may never
//! come (the metadata file, rewritten on each commit, grew by tens of KB per commit).

use std::collections::{BTreeMap, HashMap};

use iceberg::spec::Snapshot;

use dotdo_core::{Error, FencingToken, ObjectId, Result, Timestamp, Watermark};

/// Summary key of the watermarks changed since the checkpoint.
pub const WATERMARKS: &str = "dotdo.watermarks";
/// Summary key of the checkpoint file location.
pub const CHECKPOINT: &str = "dotdo.watermarks-checkpoint";
/// Summary key of the commit id.
pub const COMMIT_ID: &str = "dotdo.commit-id";
/// Summary key of the clock time of the commit (µs since the epoch).
pub const COMMITTED_AT: &str = "dotdo.committed-at-us";
/// Summary key of the bytes of inline watermarks the snapshots since the checkpoint (this one
/// included) repeated from their parents: entries not changed by their own commit, counted as
/// the inline bound counts them (an id's length plus 46 bytes each). Absent (a table written
/// before it, another engine's snapshot) reads as 0.
pub const CARRIED: &str = "dotdo.watermarks-carried";

/// Summary key marking a maintenance snapshot (`compact` or `collapse`): it rewrites rows
/// already in the table, so it adds no records.
pub const MAINTENANCE: &str = "dotdo.maintenance";

/// Per-object watermarks.
pub type Watermarks = BTreeMap<ObjectId, Watermark>;

/// The most bytes of inline watermarks a snapshot summary holds (about: each entry is counted
/// at its id's length plus the most its two numbers, quotes and separators take); past it, a
/// commit writes a checkpoint file instead, whatever `Settings::watermark_checkpoint_objects`
/// allows.
pub const INLINE_WATERMARK_BYTES: usize = 64 << 10;

/// Whether `inline` would take more than [`INLINE_WATERMARK_BYTES`] in a summary.
pub(crate) fn inline_too_large(inline: &Watermarks) -> bool {
    inline_bytes(inline.keys()) > INLINE_WATERMARK_BYTES as u64
}

/// About how many bytes the watermarks of `ids` take in a summary: each id's length plus the
/// most its two numbers, quotes and separators take.
pub(crate) fn inline_bytes<'a>(ids: impl Iterator<Item = &'a ObjectId>) -> u64 {
    ids.map(|id| id.as_str().len() as u64 + 46).sum()
}

/// The [`CARRIED`] count of `snapshot` (0 if it has none, or one that does not parse: it only
/// decides when a checkpoint is written).
pub(crate) fn carried(snapshot: &Snapshot) -> u64 {
    snapshot.summary().additional_properties.get(CARRIED).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Whether a commit whose snapshots since the checkpoint carried `carried` bytes of inline
/// watermarks over should write a checkpoint (of about `full_bytes`) instead: once the repeated
/// inline parts outweigh [`INLINE_WATERMARK_BYTES`] and the checkpoint file itself, writing it
/// costs less than carrying them on (for a table of millions of objects, whose checkpoint is
/// tens of MB, the inline bound comes first).
pub(crate) fn carried_too_much(carried: u64, full_bytes: u64) -> bool {
    carried > full_bytes.max(INLINE_WATERMARK_BYTES as u64)
}

/// Whether `snapshot` holds dotdo's state for its table: the change table's watermarks
/// ([`WATERMARKS`], in every snapshot dotdo commits to it, compactions included) or a user
/// table's stream marks (`dotdo.stream.*`). Another engine's commits carry none over; one that
/// sets some other `dotdo.` property (a note, a hand-written key) is still another engine's, so
/// its missing watermarks are not read as "nothing committed yet".
pub fn is_dotdo(snapshot: &Snapshot) -> bool {
    let props = &snapshot.summary().additional_properties;
    props.contains_key(WATERMARKS) || props.keys().any(|k| k.starts_with("dotdo.stream."))
}

/// The snapshot whose `dotdo.*` properties (watermarks, checkpoint, stream marks) hold for
/// `snapshot`'s table state: `snapshot` itself, or, if another engine wrote it (a Spark
/// compaction, a PyIceberg append), its nearest ancestor written by dotdo. `None` if no
/// ancestor was (only other engines wrote the table). `Corrupt` if the parent chain breaks at an
/// expired snapshot before one is found: the watermarks cannot be known, and taking them as
/// empty would let a stale committer through and write replays twice.
pub fn dotdo_base(
    md: &iceberg::spec::TableMetadata,
    snapshot: &iceberg::spec::SnapshotRef,
) -> Result<Option<iceberg::spec::SnapshotRef>> {
    let (mut chain, end) = chain_to_dotdo(md, snapshot);
    match end {
        ChainEnd::Dotdo => Ok(chain.pop()),
        // A history that starts without dotdo while dotdo committed to the table earlier: it was
        // reset (another engine's `REPLACE TABLE … AS SELECT` keeps the old snapshots and starts
        // `main` anew). Its watermarks are unknown, not empty: taking them as empty would write
        // replays twice and let a stale committer through.
        // (Also once the old snapshots are expired, on a format-v2 table: the table property
        // dotdo's commits set says dotdo committed to it at a sequence number below the root's.
        // A root older than that, a snapshot from before dotdo's first commit, is not a replaced
        // history: time travel to it reads no dotdo state.)
        ChainEnd::Root => match chain.last() {
            Some(root) if replaced_history(md, root) => Err(Error::corrupt(format!(
                "table {}: the history of snapshot {} starts at snapshot {} without dotdo's watermarks, \
                     after dotdo's commits (the table was replaced by another engine?)",
                md.location(),
                snapshot.snapshot_id(),
                root.snapshot_id()
            ))),
            _ => Ok(None),
        },
        // Another engine's expiry removed the newest dotdo snapshot below the head (a Spark
        // compaction, then its `expire_snapshots`): the `dotdo.*` state it held is in the table
        // property each dotdo commit sets, if that commit is the cut-off ancestor.
        ChainEnd::Expired(parent) => match last_commit_base(md, parent)? {
            Some(base) => Ok(Some(base)),
            None => Err(Error::corrupt(format!(
                "table {}: snapshot {} was written by another engine and its ancestors back to the expired \
                 snapshot {parent} carry no dotdo watermarks, nor does the table's {LAST_COMMIT} property \
                 (another engine's expiry removed the newest snapshot dotdo wrote; expire with dotdo's \
                 expire_snapshots, which keeps it)",
                md.location(),
                snapshot.snapshot_id()
            ))),
        },
        ChainEnd::Loop => Err(Error::corrupt(format!(
            "table {}: the parent chain of snapshot {} loops",
            md.location(),
            snapshot.snapshot_id()
        ))),
    }
}

/// Refuse a table that has no current snapshot although dotdo committed to it (one of its
/// snapshots is still listed, or the [`LAST_COMMIT`] property is set): its head was removed
/// (another engine's `REPLACE TABLE` without rows keeps the table and drops `main`, as does
/// removing the ref by hand). Its watermarks are unknown, not empty, as those of a history
/// another engine started anew ([`dotdo_base`]): taken as empty, they let a stale committer
/// through and wrote replays twice. `Corrupt`. A table dotdo never committed to reads as empty.
pub(crate) fn refuse_lost_head(md: &iceberg::spec::TableMetadata) -> Result<()> {
    if md.current_snapshot_id().is_none() && (last_commit_of(md).is_some() || md.snapshots().any(|s| is_dotdo(s))) {
        return Err(Error::corrupt(format!(
            "table {}: it has no current snapshot although dotdo committed to it (its main branch was removed, \
             or the table replaced by another engine?): its watermarks are unknown, not empty",
            md.location()
        )));
    }
    Ok(())
}

/// Whether `snapshot`'s watermarks are unknown because its history is expired: [`dotdo_base`]
/// refuses it (`Corrupt`) for the chain breaking at an expired snapshot with no dotdo
/// watermarks below and no [`LAST_COMMIT`] property naming that snapshot. Damaged watermarks
/// (the property itself) are not this.
pub(crate) fn history_expired_below(md: &iceberg::spec::TableMetadata, snapshot: &iceberg::spec::SnapshotRef) -> bool {
    match chain_to_dotdo(md, snapshot).1 {
        ChainEnd::Expired(parent) => matches!(last_commit_base(md, parent), Ok(None)),
        _ => false,
    }
}

/// [`dotdo_base`] for a user table: a history another engine expired (the head's parent chain
/// breaks at an expired snapshot before any dotdo snapshot) holds no dotdo state, no stream
/// marks, if nothing says dotdo ever committed to the table: no [`LAST_COMMIT`] property (every
/// dotdo commit sets it, in the same commit) and no dotdo snapshot among those the table keeps.
/// A table other engines wrote and expired was refused as `Corrupt` for good. (A table only a
/// dotdo build from before that property appended to, whose dotdo snapshots another engine
/// then expired, reads as holding no marks: replays of its batches would be appended again.)
/// The change table, which only dotdo creates, keeps [`dotdo_base`]'s rule.
pub(crate) fn user_table_base(
    md: &iceberg::spec::TableMetadata,
    snapshot: &iceberg::spec::SnapshotRef,
) -> Result<Option<iceberg::spec::SnapshotRef>> {
    match chain_to_dotdo(md, snapshot).1 {
        ChainEnd::Expired(_) if last_commit_of(md).is_none() && !md.snapshots().any(|s| is_dotdo(s)) => Ok(None),
        _ => dotdo_base(md, snapshot),
    }
}

/// The table property in which each dotdo commit also records its snapshot's `dotdo.*` summary
/// keys (with its snapshot id where known, and its sequence number), in the same commit: other
/// engines carry table properties over, so when another engine's expiry removes the newest dotdo
/// snapshot below a head of theirs, its state is still known (see [`dotdo_base`]).
pub const LAST_COMMIT: &str = "dotdo.last-commit";

/// The [`LAST_COMMIT`] property of a commit whose summary is `summary` (of snapshot
/// `snapshot_id`, if known, at sequence number `seq`): `None` if the summary holds no dotdo
/// state (no watermarks, no stream marks).
pub(crate) fn last_commit_property(
    summary: &HashMap<String, String>,
    snapshot_id: Option<i64>,
    seq: i64,
) -> Option<(String, String)> {
    let state = |k: &str| k == WATERMARKS || k == CHECKPOINT || k.starts_with("dotdo.stream.");
    if !summary.keys().any(|k| state(k)) {
        return None;
    }
    // With the commit's time: once the snapshot is expired, the snapshots built on it still
    // count from it (`effective_committed_at`).
    let keys: serde_json::Map<String, serde_json::Value> = summary
        .iter()
        .filter(|(k, _)| state(k) || *k == COMMITTED_AT)
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let mut v = serde_json::json!({ LAST_COMMIT_SUMMARY: keys, LAST_COMMIT_SEQ: seq });
    if let Some(id) = snapshot_id {
        v[LAST_COMMIT_ID] = id.into();
    }
    Some((LAST_COMMIT.to_string(), v.to_string()))
}

// The fields of the [`LAST_COMMIT`] property's JSON object.
const LAST_COMMIT_SUMMARY: &str = "summary";
const LAST_COMMIT_SEQ: &str = "sequence-number";
const LAST_COMMIT_ID: &str = "snapshot-id";

/// `md`'s [`LAST_COMMIT`] property parsed, if it has one (`Err` if it is not JSON).
fn last_commit_of(md: &iceberg::spec::TableMetadata) -> Option<serde_json::Result<serde_json::Value>> {
    md.properties().get(LAST_COMMIT).map(|raw| serde_json::from_str(raw))
}

/// Whether the [`LAST_COMMIT`] property records a dotdo commit at a sequence number below
/// `root`'s (format-v2 tables; v1 sequence numbers are all 0).
fn last_commit_before(md: &iceberg::spec::TableMetadata, root: &Snapshot) -> bool {
    if md.format_version() < iceberg::spec::FormatVersion::V2 {
        return false;
    }
    let seq = last_commit_of(md).and_then(|v| v.ok()?.get(LAST_COMMIT_SEQ)?.as_i64());
    seq.is_some_and(|seq| seq < root.sequence_number())
}

/// The snapshot id and commit time of the dotdo commit the [`LAST_COMMIT`] property records, if
/// it records both (a commit through iceberg's own path records no id).
fn last_commit_time(md: &iceberg::spec::TableMetadata) -> Option<(i64, Timestamp)> {
    let v = last_commit_of(md)?.ok()?;
    let id = v.get(LAST_COMMIT_ID)?.as_i64()?;
    let us = v.get(LAST_COMMIT_SUMMARY)?.get(COMMITTED_AT)?.as_str()?.parse::<i64>().ok()?;
    Some((id, Timestamp::from_micros(us)))
}

/// The time reads gave the expired parent `cut` of a chain: the [`LAST_COMMIT`] property's, if
/// that records `cut` (another engine's expiry took dotdo's snapshot below its own, which keeps
/// counting from it: read as of a time before that commit, it would have given rows committed
/// later).
fn expired_parent_time(last_commit: Option<(i64, Timestamp)>, cut: i64) -> Option<Timestamp> {
    last_commit.filter(|(id, _)| *id == cut).map(|(_, t)| t)
}

/// The checkpoint the [`LAST_COMMIT`] property names, if any (a cleanup keeps it: after another
/// engine's expiry it may be the only record of the watermarks).
pub(crate) fn last_commit_checkpoint(md: &iceberg::spec::TableMetadata) -> Option<String> {
    let v = last_commit_of(md)?.ok()?;
    Some(v.get(LAST_COMMIT_SUMMARY)?.get(CHECKPOINT)?.as_str()?.to_string())
}

/// The dotdo state below a head whose ancestors, none of them dotdo's, end at the expired parent
/// `cut`, from the [`LAST_COMMIT`] property, as a snapshot carrying its summary keys: if the
/// property's commit is that very snapshot (its id is `cut`). `None` otherwise: no property, one
/// without a snapshot id (written through iceberg's own commit path, which picks the id itself),
/// or another commit's (a `main` rolled back past it, more snapshots expired than the parent:
/// whether the property's commit is an ancestor of the head is not known).
fn last_commit_base(md: &iceberg::spec::TableMetadata, cut: i64) -> Result<Option<iceberg::spec::SnapshotRef>> {
    let Some(v) = last_commit_of(md) else { return Ok(None) };
    let damaged = |why: &str| Error::corrupt(format!("table {}: property {LAST_COMMIT} {why}", md.location()));
    let v = v.map_err(|e| damaged(&format!("is not JSON: {e}")))?;
    if v.get(LAST_COMMIT_ID).and_then(serde_json::Value::as_i64) != Some(cut) {
        return Ok(None);
    }
    let seq = v.get(LAST_COMMIT_SEQ).and_then(serde_json::Value::as_i64);
    let Some(keys) = v.get(LAST_COMMIT_SUMMARY).and_then(serde_json::Value::as_object) else {
        return Err(damaged("has no summary"));
    };
    let mut props = HashMap::new();
    for (k, v) in keys {
        let v = v.as_str().ok_or_else(|| damaged(&format!("holds a {k} that is not text")))?;
        props.insert(k.clone(), v.to_string());
    }
    let snapshot = iceberg::spec::Snapshot::builder()
        .with_snapshot_id(cut)
        .with_sequence_number(seq.unwrap_or(0))
        .with_timestamp_ms(0)
        .with_manifest_list(String::new())
        .with_summary(iceberg::spec::Summary {
            operation: iceberg::spec::Operation::Append,
            additional_properties: props,
        })
        .with_schema_id(md.current_schema_id())
        .build();
    Ok(Some(std::sync::Arc::new(snapshot)))
}

/// Whether `root`, the first snapshot of a history (no parent), started after dotdo had
/// committed to the table: a dotdo snapshot with a lower sequence number is in the metadata (on
/// a format-v1 table, whose snapshots all have sequence number 0, an earlier `timestamp-ms`),
/// or, once those are expired, the [`LAST_COMMIT`] property records a commit at a lower one.
/// Such a history replaced dotdo's (another engine's `REPLACE TABLE … AS SELECT`). On v1 a
/// snapshot descending from `root` is never counted: `timestamp-ms` is each writer's wall clock,
/// and a child committed by a node whose clock runs behind (iceberg accepts one up to a minute
/// before its parent) is stamped before its root.
pub(crate) fn replaced_history(md: &iceberg::spec::TableMetadata, root: &Snapshot) -> bool {
    let v1 = md.format_version() == iceberg::spec::FormatVersion::V1;
    last_commit_before(md, root)
        || md.snapshots().any(|s| {
            is_dotdo(s)
                && if v1 {
                    s.timestamp_ms() < root.timestamp_ms() && !descends_from(md, s, root.snapshot_id())
                } else {
                    s.sequence_number() < root.sequence_number()
                }
        })
}

/// Whether `root` is an ancestor of `s` in `md` (a bounded walk: damaged metadata whose parents
/// loop ends it).
fn descends_from(md: &iceberg::spec::TableMetadata, s: &Snapshot, root: i64) -> bool {
    let mut parent = s.parent_snapshot_id();
    for _ in 0..md.snapshots().len() {
        match parent {
            Some(p) if p == root => return true,
            Some(p) => parent = md.snapshot_by_id(p).and_then(|p| p.parent_snapshot_id()),
            None => return false,
        }
    }
    false
}

/// How [`chain_to_dotdo`] ended.
pub(crate) enum ChainEnd {
    /// At a dotdo snapshot (the chain's last).
    Dotdo,
    /// At the first snapshot, with no dotdo snapshot on the way.
    Root,
    /// At a parent no longer in the metadata (expired).
    Expired(i64),
    /// The parents loop (damaged metadata).
    Loop,
}

/// `snapshot` and its parents down to its nearest dotdo snapshot (included), and how the walk
/// ended: the chain whose last snapshot's `dotdo.*` properties hold for `snapshot`.
pub(crate) fn chain_to_dotdo(
    md: &iceberg::spec::TableMetadata,
    snapshot: &iceberg::spec::SnapshotRef,
) -> (Vec<iceberg::spec::SnapshotRef>, ChainEnd) {
    let mut chain = vec![snapshot.clone()];
    while chain.len() <= md.snapshots().len() + 1 {
        let s = chain.last().expect("never empty");
        if is_dotdo(s) {
            return (chain, ChainEnd::Dotdo);
        }
        let Some(parent) = s.parent_snapshot_id() else { return (chain, ChainEnd::Root) };
        match md.snapshot_by_id(parent) {
            Some(p) => chain.push(p.clone()),
            None => return (chain, ChainEnd::Expired(parent)),
        }
    }
    (chain, ChainEnd::Loop)
}

/// The time reads give `snapshot` ([`effective_committed_at`]) as a new commit on top of it
/// needs it: the latest stamp from `snapshot` up to its nearest dotdo snapshot (dotdo stamps
/// each commit no earlier than its parent's time, so the walk stops there: a commit does not
/// pay for the whole history).
pub fn parent_time(md: &iceberg::spec::TableMetadata, snapshot: &iceberg::spec::SnapshotRef) -> Timestamp {
    let (chain, end) = chain_to_dotdo(md, snapshot);
    let below = match end {
        ChainEnd::Expired(cut) => expired_parent_time(last_commit_time(md), cut),
        _ => None,
    };
    // As `effective_committed_at` folds it: from the oldest up, a snapshot stamped before the
    // one below counts as one microsecond after it.
    chain
        .iter()
        .rev()
        .fold(below, |below, s| Some(below.map_or_else(|| committed_at(s), |b| time_over(b, s))))
        .unwrap_or(Timestamp::EPOCH)
}

/// Decode the inline watermarks of a snapshot (empty if the snapshot has none, e.g. written by
/// another engine).
pub fn inline_watermarks(snapshot: &Snapshot) -> Result<Watermarks> {
    let Some(json) = snapshot.summary().additional_properties.get(WATERMARKS) else {
        return Ok(Watermarks::new());
    };
    decode_watermarks(json.as_bytes(), &format!("snapshot {} summary", snapshot.snapshot_id()))
}

/// The checkpoint file a snapshot's watermarks build on, if any.
pub fn checkpoint(snapshot: &Snapshot) -> Option<&str> {
    snapshot.summary().additional_properties.get(CHECKPOINT).map(String::as_str)
}

/// Watermark JSON as decoded: an object whose keys are unique (serde's maps keep the last of a
/// repeated key, which would silently lower an object's watermark).
struct UniqueKeys(BTreeMap<String, (u64, u64)>);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of [through, token] pairs with unique keys")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<UniqueKeys, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, (u64, u64)>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!("key {k:?} appears twice")));
                    }
                    out.insert(k, v);
                }
                Ok(UniqueKeys(out))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// Decode watermark JSON found in `what` (a summary or a checkpoint file).
pub fn decode_watermarks(json: &[u8], what: &str) -> Result<Watermarks> {
    let UniqueKeys(raw) = serde_json::from_slice(json)
        .map_err(|e| Error::corrupt(format!("{what}: undecodable watermarks")).with_source(e))?;
    raw.into_iter()
        .map(|(k, (through, token))| {
            let o = ObjectId::new(&k).map_err(|e| Error::corrupt(format!("{what}: watermark for invalid id: {e}")))?;
            // Sequence numbers and tokens dotdo writes never exceed these: larger values were
            // not written by dotdo, and arithmetic on them (`through + 1`) would overflow.
            if through > dotdo_core::MAX_SEQ || token > FencingToken::MAX.get() {
                return Err(Error::corrupt(format!(
                    "{what}: watermark of {o} out of range (through {through}, token {token}; at most {} and {})",
                    dotdo_core::MAX_SEQ,
                    FencingToken::MAX.get()
                )));
            }
            Ok((o, Watermark { through, token: FencingToken::new(token) }))
        })
        .collect()
}

/// Encode watermarks as the compact JSON of [`WATERMARKS`].
pub fn encode_watermarks(w: &Watermarks) -> String {
    let raw: BTreeMap<&str, (u64, u64)> = w.iter().map(|(k, v)| (k.as_str(), (v.through, v.token.get()))).collect();
    serde_json::to_string(&raw).unwrap_or_else(|_| "{}".to_string())
}

/// The commit id recorded in a snapshot, if any.
pub fn commit_id(snapshot: &Snapshot) -> Option<&str> {
    snapshot.summary().additional_properties.get(COMMIT_ID).map(String::as_str)
}

/// Every snapshot's time as reads (`AsOf::Timestamp`), `snapshots()` and expiry go by it: the
/// latest [`committed_at`] on its chain (its own or an ancestor's still in the metadata, or the
/// time the [`LAST_COMMIT`] property records for the expired dotdo snapshot a chain ends at).
/// Another engine's clock may stamp a snapshot before its parent; a snapshot never counts as
/// older than a snapshot it was built on, and one stamped before its parent counts as one
/// microsecond after it (tied with it, a read as of the parent's own time picked the child,
/// whose changes came later). A child stamped at its parent's very time keeps that time.
pub fn effective_committed_at(md: &iceberg::spec::TableMetadata) -> impl Fn(&Snapshot) -> Timestamp {
    let by_id: HashMap<i64, &Snapshot> = md.snapshots().map(|s| (s.snapshot_id(), s.as_ref())).collect();
    let mut at: HashMap<i64, Timestamp> = HashMap::with_capacity(by_id.len());
    let expired_dotdo = last_commit_time(md);
    for s in by_id.values() {
        // Up the parents to one already known (bounded: a damaged parent cycle stops there).
        let mut path = Vec::new();
        let mut cur = Some(*s);
        let mut base = Timestamp::from_micros(i64::MIN);
        while let Some(c) = cur {
            if let Some(t) = at.get(&c.snapshot_id()) {
                base = *t;
                break;
            }
            if path.len() > by_id.len() {
                break;
            }
            path.push(c);
            cur = c.parent_snapshot_id().and_then(|p| {
                let parent = by_id.get(&p).copied();
                if parent.is_none() {
                    // Expired: dotdo's snapshot there still gives its time.
                    base = expired_parent_time(expired_dotdo, p).unwrap_or(base);
                }
                parent
            });
        }
        for c in path.into_iter().rev() {
            base = time_over(base, c);
            at.insert(c.snapshot_id(), base);
        }
    }
    move |s: &Snapshot| at.get(&s.snapshot_id()).copied().unwrap_or_else(|| committed_at(s))
}

/// The time reads give snapshot `s` built on one they give `below`: its own [`committed_at`],
/// or one microsecond after `below` if it is stamped earlier (another engine's clock behind).
fn time_over(below: Timestamp, s: &Snapshot) -> Timestamp {
    let own = committed_at(s);
    if own < below {
        below.plus(std::time::Duration::from_micros(1))
    } else {
        own
    }
}

/// The commit time of a snapshot: dotdo's clock time if recorded, else Iceberg's `timestamp-ms`.
pub fn committed_at(snapshot: &Snapshot) -> Timestamp {
    snapshot
        .summary()
        .additional_properties
        .get(COMMITTED_AT)
        .and_then(|v| v.parse::<i64>().ok())
        .map(Timestamp::from_micros)
        .unwrap_or_else(|| Timestamp::from_millis(snapshot.timestamp_ms()))
}

/// Records added by a snapshot (its `added-records` metric; 0 for a `replace` snapshot, dotdo's
/// maintenance or another engine's compaction, which only rewrites rows already in the table).
pub fn added_records(snapshot: &Snapshot) -> u64 {
    let p = &snapshot.summary().additional_properties;
    if p.contains_key(MAINTENANCE) || snapshot.summary().operation == iceberg::spec::Operation::Replace {
        return 0;
    }
    p.get("added-records").and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The summary properties of a new commit.
pub fn properties(
    inline: &Watermarks,
    checkpoint: Option<&str>,
    carried: u64,
    commit_id: &str,
    at: Timestamp,
) -> HashMap<String, String> {
    let mut p = HashMap::from([
        (WATERMARKS.to_string(), encode_watermarks(inline)),
        (COMMIT_ID.to_string(), commit_id.to_string()),
        (COMMITTED_AT.to_string(), at.as_micros().to_string()),
    ]);
    if carried > 0 {
        p.insert(CARRIED.to_string(), carried.to_string());
    }
    if let Some(c) = checkpoint {
        p.insert(CHECKPOINT.to_string(), c.to_string());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermarks_roundtrip_as_compact_json() {
        let mut w = Watermarks::new();
        w.insert(ObjectId::new("a:1").expect("id"), Watermark { through: 5, token: FencingToken::new(2) });
        let json = encode_watermarks(&w);
        assert_eq!(json, r#"{"a:1":[5,2]}"#);
        assert_eq!(decode_watermarks(json.as_bytes(), "test").expect("decode"), w);
        assert_eq!(decode_watermarks(b"{", "x").expect_err("bad").kind(), &dotdo_core::ErrorKind::Corrupt);
    }

    /// Another engine's compaction (a `replace` snapshot with no dotdo keys) added no records,
    /// whatever its `added-records` metric counts of the rows it rewrote.
    #[test]
    fn a_replace_snapshot_added_no_records() {
        use iceberg::spec::{Operation, Snapshot, Summary};
        let snap = |operation| {
            Snapshot::builder()
                .with_snapshot_id(1)
                .with_sequence_number(1)
                .with_timestamp_ms(1)
                .with_manifest_list("file:///t/metadata/snap-1.avro")
                .with_summary(Summary {
                    operation,
                    additional_properties: HashMap::from([("added-records".to_string(), "5".to_string())]),
                })
                .with_schema_id(0)
                .build()
        };
        assert_eq!(added_records(&snap(Operation::Append)), 5);
        assert_eq!(added_records(&snap(Operation::Replace)), 0);
    }

    #[test]
    fn out_of_range_watermarks_are_corrupt() {
        let max = (dotdo_core::MAX_SEQ, FencingToken::MAX.get());
        let ok = format!(r#"{{"a":[{},{}]}}"#, max.0, max.1);
        assert_eq!(
            decode_watermarks(ok.as_bytes(), "t").expect("at the limits")[&ObjectId::new("a").expect("id")].through,
            max.0
        );
        for json in [format!(r#"{{"a":[{},1]}}"#, u64::MAX), format!(r#"{{"a":[1,{}]}}"#, max.1 + 1)] {
            let e = decode_watermarks(json.as_bytes(), "checkpoint x").expect_err("out of range");
            assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{e}");
            assert!(e.to_string().contains("checkpoint x"), "{e}");
        }
    }

    /// A format-v1 table's history: a root stamped at 1000 ms and dotdo's child of it, stamped
    /// `child_ms` by its writer's clock; and, if `replaced`, another root (a history started
    /// anew) stamped at 2000 ms.
    fn v1_history(child_ms: i64, replaced: bool) -> iceberg::spec::TableMetadata {
        let snap = |id: i64, parent: Option<i64>, ms: i64, dotdo: bool| {
            let summary = if dotdo {
                format!(r#"{{"operation":"append","{WATERMARKS}":"{{}}"}}"#)
            } else {
                r#"{"operation":"append"}"#.to_string()
            };
            let parent = parent.map_or(String::new(), |p| format!(r#""parent-snapshot-id":{p},"#));
            format!(
                r#"{{"snapshot-id":{id},{parent}"timestamp-ms":{ms},"manifest-list":"file:///t/metadata/snap-{id}.avro","summary":{summary},"schema-id":0}}"#
            )
        };
        let mut snaps = vec![snap(1, None, 1000, true), snap(2, Some(1), child_ms, true)];
        if replaced {
            snaps.push(snap(3, None, 2000, false));
        }
        let json = format!(
            r#"{{"format-version":1,"table-uuid":"8d0e6b2a-3c4f-4d5e-9f60-718293a4b5c6","location":"file:///t",
                "last-updated-ms":2000,"last-column-id":1,
                "schema":{{"type":"struct","schema-id":0,"fields":[{{"id":1,"name":"x","required":false,"type":"long"}}]}},
                "partition-spec":[],"properties":{{}},"current-snapshot-id":{},"snapshots":[{}]}}"#,
            if replaced { 3 } else { 2 },
            snaps.join(",")
        );
        serde_json::from_str(&json).expect("v1 metadata")
    }

    /// On a format-v1 table a dotdo child stamped before its root (its writer's clock behind the
    /// root's) does not make the root a replaced history (time travel before it was `Corrupt`);
    /// a root started after dotdo's commits still is one.
    #[test]
    fn a_v1_child_stamped_before_its_root_is_not_a_replaced_history() {
        let md = v1_history(995, false);
        let root = md.snapshot_by_id(1).expect("root");
        assert!(!replaced_history(&md, root), "a child of the root, stamped 5 ms before it");
        let md = v1_history(1005, true);
        assert!(replaced_history(&md, md.snapshot_by_id(3).expect("new root")), "dotdo committed before it");
        assert!(!replaced_history(&md, md.snapshot_by_id(1).expect("old root")));
    }

    /// A key written twice is damage (serde kept the last one: `a`'s watermark read as 0, and a
    /// stale committer's or a replay's records went through).
    #[test]
    fn a_watermark_key_written_twice_is_corrupt() {
        let e = decode_watermarks(br#"{"a":[9,5],"b":[1,1],"a":[0,0]}"#, "summary s").expect_err("a repeated key");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("summary s"), "{e}");
        let source = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default();
        assert!(source.contains("\"a\" appears twice"), "{source}");
        let w = decode_watermarks(br#"{"a":[9,5],"b":[1,1]}"#, "summary s").expect("unique keys");
        assert_eq!(w.len(), 2);
        assert!(decode_watermarks(br#"[]"#, "summary s").is_err(), "an array is no watermark object");
    }
}
