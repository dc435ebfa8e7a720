//! [`ObjectTxn`]: what a handler sees of its object's state.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;

use super::Inner;
use crate::cold::SnapshotId;
use crate::error::{Error, Result};
use crate::ids::{validate_key, validate_value, FencingToken, ObjectId};
use crate::record::{KeyRange, Seq, WriteBatch, WriteOp};

/// State of an object activated lazily: the hot store has not been restored yet; reads go to cold
/// storage at `snapshot` (through the accelerator when there is one) and are cached.
#[derive(Debug)]
pub(crate) struct LazyState {
    pub(crate) snapshot: Option<SnapshotId>,
    pub(crate) through: Seq,
    pub(crate) cache: HashMap<String, Option<Bytes>>,
    /// Keys preloaded, each with whether it was read since.
    pub(crate) preloaded: HashMap<String, bool>,
    /// Every key of the state at `snapshot` is in `cache` (loaded whole, as it is without an
    /// accelerator): a key missing there is absent, with no need to ask cold storage.
    pub(crate) complete: bool,
    /// What `cache` holds of keys not preloaded, as [`LazyState::entry_bytes`] counts it.
    pub(crate) cache_bytes: usize,
    /// When each cached key not preloaded was last read or cached (ticks of `clock`): past the
    /// budget the least recently used go first.
    used: HashMap<String, u64>,
    clock: u64,
    /// Cold storage moved past `through` (found when the snapshot had to be re-pinned): this
    /// activation's reads and restore can never complete, the next call activates afresh.
    pub(crate) moved: bool,
    /// The restore into hot storage was `Fenced` (a newer holder took the object, whatever this
    /// node's clock says of its lease): what the call answers anyway (its handler swallowed that
    /// error) is refused, and the activation dropped.
    pub(crate) fenced: bool,
    /// The hot store refused the restore for good (a non-retryable `Conflict`: its sequence is
    /// past `through`, [`restore_behind_hot`](crate::record::restore_behind_hot)): as with
    /// `moved`, the restore can never complete and the next call activates afresh.
    pub(crate) refused: bool,
}

impl LazyState {
    /// The activation found its object's cold state moved on from `through` (to `to`, if
    /// known): it is spent (`moved`), and this is the `Conflict` its calls answer.
    pub(crate) fn moved_on(&mut self, object: &ObjectId, to: Option<Seq>) -> Error {
        self.moved = true;
        let to = to.map_or_else(String::new, |t| format!(" to {t}"));
        Error::new(
            crate::error::ErrorKind::Conflict,
            format!("cold state of {object} moved from seq {}{to} during a lazy restore", self.through),
        )
    }

    pub(crate) fn new(snapshot: Option<SnapshotId>, through: Seq) -> Self {
        LazyState {
            snapshot,
            through,
            cache: HashMap::new(),
            preloaded: HashMap::new(),
            complete: false,
            cache_bytes: 0,
            used: HashMap::new(),
            clock: 0,
            moved: false,
            fenced: false,
            refused: false,
        }
    }

    /// A cache entry's weight: its key (kept twice: in the cache and in its recency), its value
    /// and a fixed overhead.
    fn entry_bytes(key: &str, value: &Option<Bytes>) -> usize {
        2 * key.len() + value.as_ref().map_or(0, Bytes::len) + 64
    }

    /// Cache `key`'s value as read at the snapshot. A cache that does not hold the whole state
    /// is bounded by `budget` bytes: past it, the least recently used of the entries read one at
    /// a time are dropped until half the budget is left (they are read from cold storage again
    /// if asked for, at the same snapshot, so answers do not change); preloaded keys, which the
    /// caller named, stay. A read-only object probed with ever new keys used to grow it without
    /// end.
    pub(crate) fn remember(&mut self, key: String, value: Option<Bytes>, budget: usize) {
        // Preloaded keys are not counted against the budget (nor dropped).
        let counted = !self.preloaded.contains_key(&key);
        let add = if counted { Self::entry_bytes(&key, &value) } else { 0 };
        // An entry counted before (read one at a time, then preloaded) is counted no more.
        let was_counted = self.used.remove(&key).is_some();
        if let Some(old) = self.cache.insert(key.clone(), value) {
            if was_counted {
                self.cache_bytes = self.cache_bytes.saturating_sub(Self::entry_bytes(&key, &old));
            }
        }
        if counted {
            self.cache_bytes = self.cache_bytes.saturating_add(add);
            self.clock += 1;
            self.used.insert(key, self.clock);
        }
        if !self.complete && self.cache_bytes > budget {
            self.shrink(budget / 2);
        }
    }

    /// A read of `key` served from the cache: it becomes the most recently used.
    pub(crate) fn touch(&mut self, key: &str) {
        if let Some(tick) = self.used.get_mut(key) {
            self.clock += 1;
            *tick = self.clock;
        }
    }

    /// Drop the least recently used counted entries until at most `target` bytes are left.
    fn shrink(&mut self, target: usize) {
        let mut by_age: Vec<(u64, String)> = self.used.iter().map(|(k, t)| (*t, k.clone())).collect();
        by_age.sort_unstable();
        for (_, key) in by_age {
            if self.cache_bytes <= target {
                break;
            }
            self.used.remove(&key);
            if let Some(old) = self.cache.remove(&key) {
                self.cache_bytes = self.cache_bytes.saturating_sub(Self::entry_bytes(&key, &old));
            }
        }
    }

    /// Cache `key` of the whole state being loaded (no bound: the whole state is the cache),
    /// keeping a value already cached.
    pub(crate) fn remember_whole(&mut self, key: String, value: Bytes) {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.cache.entry(key) {
            let value = Some(value);
            self.cache_bytes += Self::entry_bytes(slot.key(), &value);
            slot.insert(value);
        }
    }
}

/// A handler's view of one object: reads see the object's state plus the handler's own writes;
/// writes are buffered and committed atomically, under the lease's fencing token, when the
/// handler returns `Ok`. If the handler fails, none of its writes is made. (A lazily restored
/// object's `list` completes its restore into hot storage first: that stays, as it is the
/// object's cold state, not a write of the handler.)
pub struct ObjectTxn<'a> {
    pub(crate) inner: &'a Arc<Inner>,
    pub(crate) object: &'a ObjectId,
    pub(crate) token: FencingToken,
    pub(crate) lazy: &'a mut Option<LazyState>,
    /// Each written key's index in `ops`.
    pub(crate) writes: BTreeMap<String, usize>,
    /// The writes to commit, one per key (a key's later write replaces its earlier one in
    /// place: the commit is atomic, only each key's last write matters).
    pub(crate) ops: Vec<WriteOp>,
    /// Key and value bytes of `ops`, as [`WriteBatch::validate`](crate::WriteBatch::validate)
    /// counts them.
    pub(crate) bytes: usize,
}

impl std::fmt::Debug for ObjectTxn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectTxn")
            .field("object", self.object)
            .field("token", &self.token)
            .field("ops", &self.ops.len())
            .finish()
    }
}

impl<'a> ObjectTxn<'a> {
    /// The object this transaction belongs to.
    pub fn object(&self) -> &ObjectId {
        self.object
    }

    /// The fencing token the writes will carry.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The value of `key`: the handler's own write if any, else the object's state.
    pub async fn get(&mut self, key: &str) -> Result<Option<Bytes>> {
        validate_key(key)?;
        if let Some(&i) = self.writes.get(key) {
            return Ok(written(&self.ops[i]));
        }
        match self.lazy.as_mut() {
            None => self.inner.hot.get(self.object, key).await,
            Some(lazy) => {
                if let Some(v) = lazy.cache.get(key).cloned() {
                    lazy.touch(key);
                    let mut m = self.inner.metrics.lock();
                    m.lazy_cache_hits += 1;
                    // The first read of each preloaded key: hits never exceed preloaded keys.
                    if let Some(read) = lazy.preloaded.get_mut(key).filter(|read| !**read) {
                        *read = true;
                        m.preload_hits += 1;
                    }
                    return Ok(v);
                }
                if lazy.complete {
                    self.inner.metrics.lock().lazy_cache_hits += 1;
                    return Ok(None);
                }
                self.inner.metrics.lock().lazy_cache_misses += 1;
                let Some(accel) = &self.inner.accel else {
                    // Without an accelerator a key's value costs a read of the whole state:
                    // keep all of it, so each later read is a cache hit.
                    super::cache_whole_state(self.inner, self.object, lazy).await?;
                    return Ok(lazy.cache.get(key).cloned().flatten());
                };
                let (inner, object) = (self.inner, self.object);
                let v = super::at_pinned(inner, object, lazy, |as_of| accel.lookup(object, key, as_of))
                    .await?
                    .value
                    .map(|v| v.value);
                lazy.remember(key.to_string(), v.clone(), self.inner.settings.lazy_cache_bytes);
                Ok(v)
            }
        }
    }

    /// Set `key` to `value` (buffered until commit). Invalid keys, values over 2 MiB, and a
    /// write that would take the transaction past one batch's limits
    /// ([`WriteBatch::MAX_OPS`](crate::WriteBatch::MAX_OPS) keys written,
    /// [`WriteBatch::MAX_BYTES`](crate::WriteBatch::MAX_BYTES) of keys and values, counting each
    /// key's last write) fail here, and leave the transaction as it was.
    pub fn put(&mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Result<()> {
        let (key, value) = (key.into(), value.into());
        validate_key(&key)?;
        validate_value(&value)?;
        self.buffer(WriteOp::Put { key, value })
    }

    /// Remove `key` (buffered until commit). Fails like [`put`](Self::put).
    pub fn delete(&mut self, key: impl Into<String>) -> Result<()> {
        let key = key.into();
        validate_key(&key)?;
        self.buffer(WriteOp::Delete { key })
    }

    /// Buffer `op`, replacing the key's earlier write; refused if the transaction would exceed
    /// one batch's limits.
    fn buffer(&mut self, op: WriteOp) -> Result<()> {
        let size = |op: &WriteOp| match op {
            WriteOp::Put { key, value } => key.len().saturating_add(value.len()),
            WriteOp::Delete { key } => key.len(),
        };
        let slot = self.writes.get(op.key()).copied();
        let replaced = slot.map_or(0, |i| size(&self.ops[i]));
        let bytes = self.bytes.saturating_sub(replaced).saturating_add(size(&op));
        let n = self.ops.len() + usize::from(slot.is_none());
        if n > WriteBatch::MAX_OPS {
            return Err(Error::limit("keys written in one transaction", WriteBatch::MAX_OPS as u64, n as u64));
        }
        if bytes > WriteBatch::MAX_BYTES {
            return Err(Error::limit(
                "key and value bytes written in one transaction",
                WriteBatch::MAX_BYTES as u64,
                bytes as u64,
            ));
        }
        self.bytes = bytes;
        match slot {
            Some(i) => self.ops[i] = op,
            None => {
                self.writes.insert(op.key().to_string(), self.ops.len());
                self.ops.push(op);
            }
        }
        Ok(())
    }

    /// Live entries with keys in `range`, in key order, including the handler's own writes. On a
    /// lazily activated object this completes the restore first.
    pub async fn list(&mut self, range: KeyRange) -> Result<Vec<(String, Bytes)>> {
        if self.lazy.is_some() {
            super::complete_restore(self.inner, self.object, self.token, self.lazy)
                .await
                .map_err(|e| super::before_the_call(e, self.object, "completing the object's restore before a list"))?;
        }
        let mut merged: BTreeMap<String, Bytes> = self
            .inner
            .hot
            .list(self.object, range.clone(), None)
            .await?
            .into_iter()
            .map(|e| (e.key, e.value))
            .collect();
        // The buffered writes in the range only (a scan of all of them per call made a handler
        // paging through a small prefix among many writes quadratic).
        if !range.is_empty() {
            for (k, &i) in self.writes.range::<str, _>(range.as_bounds()) {
                match written(&self.ops[i]) {
                    Some(v) => merged.insert(k.clone(), v),
                    None => merged.remove(k),
                };
            }
        }
        Ok(merged.into_iter().collect())
    }

    /// Number of keys with a buffered write (a key written twice counts once).
    pub fn pending_writes(&self) -> usize {
        self.ops.len()
    }
}

/// What a buffered write leaves its key holding (`None`: deleted).
fn written(op: &WriteOp) -> Option<Bytes> {
    match op {
        WriteOp::Put { value, .. } => Some(value.clone()),
        WriteOp::Delete { .. } => None,
    }
}
