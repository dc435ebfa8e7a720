//! Change records, write batches and key ranges.
//!
//! A [`ChangeRecord`] is one entry of an object's change log and one row of the cold table. Its
//! fields follow the predecessor's event shape (`do_id`, `type`, `key`, `value`, `timestamp`) plus
//! what recovery and fencing need (`op`, `seq`, `token`).

use std::ops::Bound;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::ids::{validate_key, validate_type_name, validate_value, FencingToken, ObjectId};
use crate::time::Timestamp;

/// Per-object sequence number of a change; the first change of an object has `seq == 1`.
pub type Seq = u64;

/// The largest sequence number of an object: 2^44 - 1 (like [`FencingToken::MAX`], so that
/// every backend, libSQL's remote transport included, can carry it). A write that would pass it
/// is `LimitExceeded`; a restore or cold record beyond it is `InvalidInput`.
///
/// [`FencingToken::MAX`]: crate::FencingToken::MAX
pub const MAX_SEQ: Seq = (1 << 44) - 1;

/// `InvalidInput` for a sequence number above [`MAX_SEQ`].
pub fn validate_seq(seq: Seq, what: &str) -> Result<()> {
    if seq > MAX_SEQ {
        return Err(Error::invalid(format!("{what} {seq} is above the largest sequence number {MAX_SEQ}")));
    }
    Ok(())
}

/// The receipt of `n` changes appended after `last`: `LimitExceeded` if they would pass
/// [`MAX_SEQ`].
pub fn receipt_after(last: Seq, n: u64) -> Result<WriteReceipt> {
    match last.checked_add(n) {
        Some(end) if end <= MAX_SEQ => Ok(WriteReceipt { first_seq: last + 1, last_seq: end }),
        _ => Err(Error::limit("sequence number", MAX_SEQ, last.saturating_add(n))),
    }
}

/// The kind of change.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Op {
    /// The key was set to a value.
    Put,
    /// The key was removed.
    Delete,
}

impl Op {
    /// `"put"` or `"delete"`, as stored in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Delete => "delete",
        }
    }

    /// Parse `"put"` / `"delete"`.
    pub fn parse(s: &str) -> Result<Op> {
        match s {
            "put" => Ok(Op::Put),
            "delete" => Ok(Op::Delete),
            other => Err(Error::corrupt(format!("unknown op {other:?}"))),
        }
    }
}

/// One change of one key of one object.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ChangeRecord {
    /// The object (`do_id`).
    pub object: ObjectId,
    /// Per-object sequence number, strictly increasing, without gaps.
    pub seq: Seq,
    /// The state key.
    pub key: String,
    /// Put or delete.
    pub op: Op,
    /// The new value for a put; empty for a delete.
    pub value: Bytes,
    /// The fencing token the write was made under.
    pub token: FencingToken,
    /// When the write was made (the writer's clock).
    pub timestamp: Timestamp,
    /// The object's type name (`type` in the event shape).
    pub type_name: String,
}

impl ChangeRecord {
    /// Check the record's own fields against the limits every store shares: the key, the value
    /// size, the type name, and the token (not `NONE`, at most `FencingToken::MAX`).
    pub fn validate(&self) -> Result<()> {
        validate_key(&self.key)
            .and_then(|()| validate_value(&self.value))
            .and_then(|()| validate_type_name(&self.type_name))
            .and_then(|()| self.token.validate())
            .map_err(|e| e.context(format!("change record {} of {}", self.seq, self.object)))
    }
}

/// One operation of a [`WriteBatch`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum WriteOp {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: String,
        /// The value (at most 2 MiB).
        value: Bytes,
    },
    /// Remove `key` (a no-op for the state if absent, but still logged).
    Delete {
        /// The key.
        key: String,
    },
}

impl WriteOp {
    /// The key this operation touches.
    pub fn key(&self) -> &str {
        match self {
            WriteOp::Put { key, .. } | WriteOp::Delete { key } => key,
        }
    }
}

/// An atomic batch of writes to one object. Applied all or nothing, in order.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct WriteBatch {
    /// The object's type name, recorded with each change.
    pub type_name: String,
    /// The operations, applied in order.
    pub ops: Vec<WriteOp>,
}

impl WriteBatch {
    /// Largest number of operations in one batch.
    pub const MAX_OPS: usize = 1_000_000;

    /// Largest total of key and value bytes in one batch (64 MiB): one transaction on every
    /// backend, and on a remote libSQL primary one HTTP request, which must stay of a size
    /// servers accept.
    pub const MAX_BYTES: usize = 64 << 20;

    /// An empty batch for objects of `type_name`.
    pub fn new(type_name: impl Into<String>) -> Self {
        WriteBatch { type_name: type_name.into(), ops: Vec::new() }
    }

    /// Add a put.
    pub fn put(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.ops.push(WriteOp::Put { key: key.into(), value: value.into() });
        self
    }

    /// Add a delete.
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(WriteOp::Delete { key: key.into() });
        self
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch has no operations.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Check every documented limit: type name, keys, value sizes, operation count, total
    /// bytes.
    pub fn validate(&self) -> Result<()> {
        validate_type_name(&self.type_name)?;
        if self.ops.len() > Self::MAX_OPS {
            return Err(Error::limit("operations in one batch", Self::MAX_OPS as u64, self.ops.len() as u64));
        }
        let mut bytes = 0usize;
        for (i, op) in self.ops.iter().enumerate() {
            // Which operation of the batch: a batch may hold a million.
            let which = |e: Error| {
                let key: String = op.key().chars().take(64).collect();
                e.context(format!("operation {i} of the batch (key {key:?})"))
            };
            validate_key(op.key()).map_err(which)?;
            bytes = bytes.saturating_add(op.key().len());
            if let WriteOp::Put { value, .. } = op {
                validate_value(value).map_err(which)?;
                bytes = bytes.saturating_add(value.len());
            }
        }
        if bytes > Self::MAX_BYTES {
            return Err(Error::limit("key and value bytes in one batch", Self::MAX_BYTES as u64, bytes as u64));
        }
        Ok(())
    }
}

/// What a successful hot write assigned.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct WriteReceipt {
    /// The sequence number of the first change (equal to `last_seq + 1` for an empty batch).
    pub first_seq: Seq,
    /// The sequence number of the last change (the object's current sequence number).
    pub last_seq: Seq,
}

/// A range of keys, for listing and scans.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct KeyRange {
    /// Lower bound.
    pub start: Bound<String>,
    /// Upper bound.
    pub end: Bound<String>,
}

impl KeyRange {
    /// Every key.
    pub fn all() -> Self {
        KeyRange { start: Bound::Unbounded, end: Bound::Unbounded }
    }

    /// Keys starting with `prefix`.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        let p: String = prefix.into();
        if p.is_empty() {
            return Self::all();
        }
        let end = prefix_successor(&p).map_or(Bound::Unbounded, Bound::Excluded);
        KeyRange { start: Bound::Included(p), end }
    }

    /// Keys in `[start, end)`.
    pub fn between(start: impl Into<String>, end: impl Into<String>) -> Self {
        KeyRange { start: Bound::Included(start.into()), end: Bound::Excluded(end.into()) }
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: &str) -> bool {
        let lo = match &self.start {
            Bound::Included(s) => key >= s.as_str(),
            Bound::Excluded(s) => key > s.as_str(),
            Bound::Unbounded => true,
        };
        let hi = match &self.end {
            Bound::Included(e) => key <= e.as_str(),
            Bound::Excluded(e) => key < e.as_str(),
            Bound::Unbounded => true,
        };
        lo && hi
    }

    /// Whether the range selects no key at all: its start lies after its end, or they meet and
    /// one of them excludes the meeting point (`between("b", "a")`, `between("a", "a")`).
    pub fn is_empty(&self) -> bool {
        match (&self.start, &self.end) {
            (Bound::Unbounded, _) | (_, Bound::Unbounded) => false,
            (Bound::Included(s), Bound::Included(e)) => s > e,
            (Bound::Included(s) | Bound::Excluded(s), Bound::Included(e) | Bound::Excluded(e)) => s >= e,
        }
    }

    /// The range as a pair of `&str` bounds (for `BTreeMap::range`; check
    /// [`is_empty`](Self::is_empty) first: `BTreeMap::range` panics on an inverted range).
    pub fn as_bounds(&self) -> (Bound<&str>, Bound<&str>) {
        (as_ref_bound(&self.start), as_ref_bound(&self.end))
    }
}

fn as_ref_bound(b: &Bound<String>) -> Bound<&str> {
    match b {
        Bound::Included(s) => Bound::Included(s.as_str()),
        Bound::Excluded(s) => Bound::Excluded(s.as_str()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// The smallest string greater than every string with prefix `p`, if any.
pub fn prefix_successor(p: &str) -> Option<String> {
    let mut chars: Vec<char> = p.chars().collect();
    while let Some(c) = chars.pop() {
        let mut next = c as u32 + 1;
        // skip the surrogate gap
        if (0xD800..=0xDFFF).contains(&next) {
            next = 0xE000;
        }
        if let Some(n) = char::from_u32(next) {
            chars.push(n);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// A key's current value as stored, with the change that set it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Bytes,
    /// The sequence number of the change that set it.
    pub seq: Seq,
}

impl Entry {
    /// Check the key and value limits and the sequence number, 1 to [`MAX_SEQ`] (what a restore
    /// must refuse before writing anything: an entry at 0 was set by no change, and left the
    /// object with live keys and a last sequence number of 0).
    pub fn validate(&self) -> Result<()> {
        validate_key(&self.key)?;
        if self.seq == 0 {
            return Err(Error::invalid(format!("entry {:?} has seq 0: sequence numbers start at 1", self.key)));
        }
        validate_seq(self.seq, "entry seq")?;
        validate_value(&self.value)
    }
}

/// Check the arguments of [`HotStore::restore`](crate::HotStore::restore) before anything is
/// written: every entry within the limits, `through_seq` a valid sequence number, each key at
/// most once (an object's state holds one value per key) and no entry newer than `through_seq`
/// (writes after the restore continue at `through_seq + 1`). `InvalidInput` otherwise
/// (`LimitExceeded` for a key or value over its size limit), naming the offending key.
pub fn validate_restore(entries: &[Entry], through_seq: Seq) -> Result<()> {
    validate_seq(through_seq, "restore through_seq")?;
    let mut keys = std::collections::HashSet::with_capacity(entries.len());
    for e in entries {
        e.validate().map_err(|err| {
            // (At most the key's first 64 characters: an oversized key is not repeated whole.)
            let key: String = e.key.chars().take(64).collect();
            err.context(format!("restore entry {key:?}"))
        })?;
        if e.seq > through_seq {
            return Err(Error::invalid(format!(
                "restore entry {:?} has seq {} above the restore's through_seq {through_seq}",
                e.key, e.seq
            )));
        }
        if !keys.insert(e.key.as_str()) {
            return Err(Error::invalid(format!("restore entries hold key {:?} more than once", e.key)));
        }
    }
    Ok(())
}

/// The refusal of a restore through `through_seq` when the hot store's sequence (`last`, if
/// known) is already past it: the state offered is older than the hot state, and no retry of
/// the same restore can succeed (sequence numbers never go back), so it is a `Conflict` that
/// is not retryable. (Pending changes are the other, retryable, restore conflict.)
pub fn restore_behind_hot(object: &crate::ObjectId, through_seq: Seq, last: Option<Seq>) -> Error {
    let last = last.map_or_else(String::new, |l| format!(" (hot last seq {l})"));
    Error::new(
        crate::ErrorKind::Conflict,
        format!(
            "cannot restore {object} through seq {through_seq}: the hot store is past it{last}, so the state offered \
             is older than the object's; sequence numbers never go back"
        ),
    )
    .with_retryable(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restore's refused entry is named (a value over the limit said only its size).
    #[test]
    fn restore_refusals_name_the_entry() {
        let big = Entry { key: "profile".into(), value: Bytes::from(vec![b'x'; crate::MAX_VALUE_BYTES + 1]), seq: 1 };
        let e = validate_restore(&[big], 1).expect_err("over the limit");
        assert!(matches!(e.kind(), crate::ErrorKind::LimitExceeded { .. }), "{e}");
        assert!(e.to_string().contains("\"profile\""), "{e}");
        let late = Entry { key: "late".into(), value: Bytes::new(), seq: crate::MAX_SEQ + 1 };
        let e = validate_restore(&[late], 1).expect_err("seq out of range");
        assert_eq!(e.kind(), &crate::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("\"late\""), "{e}");
        // An oversized key: its first 64 characters, not all of it.
        let long = Entry { key: "k".repeat(crate::MAX_KEY_BYTES + 1), value: Bytes::new(), seq: 1 };
        let e = validate_restore(&[long], 1).expect_err("key over the limit");
        assert!(matches!(e.kind(), crate::ErrorKind::LimitExceeded { .. }), "{e}");
        assert!(e.to_string().contains(&format!("\"{}\"", "k".repeat(64))), "{e}");
        assert!(!e.to_string().contains(&"k".repeat(65)), "{e}");
    }

    #[test]
    fn prefix_range_contains_exactly_the_prefixed_keys() {
        let r = KeyRange::prefix("user/");
        assert!(r.contains("user/"));
        assert!(r.contains("user/zzz"));
        assert!(!r.contains("user0"));
        assert!(!r.contains("usex"));
        assert!(!r.contains("use"));
        assert_eq!(prefix_successor("a\u{10FFFF}"), Some("b".to_string()));
        assert_eq!(prefix_successor("\u{10FFFF}"), None);
    }

    #[test]
    fn batch_validation_reports_limits() {
        let ok = WriteBatch::new("User").put("a", vec![1u8; 10]).delete("b");
        assert!(ok.validate().is_ok());
        let big = WriteBatch::new("User").put("a", vec![0u8; crate::MAX_VALUE_BYTES + 1]);
        assert!(big.validate().is_err());
        assert!(WriteBatch::new("").validate().is_err());
        assert!(WriteBatch::new("T").put("", "x").validate().is_err());
        // The error says which operation of the batch, and its key.
        let third =
            WriteBatch::new("T").put("a", "x").delete("b").put("profile", vec![0u8; crate::MAX_VALUE_BYTES + 1]);
        let e = third.validate().expect_err("oversized");
        assert!(matches!(e.kind(), crate::ErrorKind::LimitExceeded { .. }), "{e}");
        assert!(e.to_string().contains("operation 2 of the batch (key \"profile\")"), "{e}");
        let e = WriteBatch::new("T").put("a", "x").put("bad\u{1}key", "x").validate().expect_err("control char");
        assert!(e.to_string().contains("operation 1"), "{e}");
    }
}
