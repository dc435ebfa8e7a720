use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::guard::rules::{self, LeaseRow};
use crate::guard::{ConsistencyGuard, Lease};
use crate::hot::{HotStore, ObjectInfo};
use crate::ids::{FencingToken, NodeId, ObjectId};
use crate::record::{ChangeRecord, Entry, KeyRange, Op, Seq, WriteBatch, WriteOp, WriteReceipt};
use crate::time::{Clock, SystemClock};

#[derive(Debug, Default)]
struct ObjectState {
    entries: BTreeMap<String, Entry>,
    log: BTreeMap<Seq, ChangeRecord>,
    last_seq: Seq,
    truncated_through: Seq,
    max_token: FencingToken,
    value_bytes: u64,
    /// Dropped by an evict and not restored since.
    evicted: bool,
}

#[derive(Debug, Default)]
struct State {
    /// Ordered, so a page of objects with pending changes is a range, not a sort of them all.
    objects: BTreeMap<ObjectId, ObjectState>,
    leases: HashMap<ObjectId, LeaseRow>,
}

impl State {
    /// The highest token known for `object`, from writes and from issued leases.
    fn max_token(&self, object: &ObjectId) -> FencingToken {
        let w = self.objects.get(object).map_or(FencingToken::NONE, |o| o.max_token);
        let l = self.leases.get(object).map_or(FencingToken::NONE, |r| r.token);
        w.max(l)
    }

    /// `Fenced` if `token` is below the object's maximum; changes nothing.
    fn check_token(&self, object: &ObjectId, token: FencingToken) -> Result<()> {
        token.validate()?;
        let current = self.max_token(object);
        if token < current {
            return Err(Error::fenced(object, token, current));
        }
        Ok(())
    }

    /// Raise the object's maximum to `token` (checked) once the call is known to succeed: a
    /// refused call changes nothing, as on the SQL backends where it rolls back.
    fn raise(&mut self, object: &ObjectId, token: FencingToken) -> &mut ObjectState {
        let o = self.objects.entry(object.clone()).or_default();
        o.max_token = o.max_token.max(token);
        o
    }

    /// The object's (last seq, truncated through), zeros if unknown.
    fn seqs(&self, object: &ObjectId) -> (Seq, Seq) {
        self.objects.get(object).map_or((0, 0), |o| (o.last_seq, o.truncated_through))
    }
}

/// In-memory [`HotStore`] + [`ConsistencyGuard`] reference backend. Cheap to clone; clones share
/// state.
///
/// ```
/// # futures::executor::block_on(async {
/// use std::time::Duration;
/// use dotdo_core::{ConsistencyGuard, HotStore, HotStoreExt, MemoryBackend, NodeId, ObjectId};
///
/// let backend = MemoryBackend::new();
/// let obj = ObjectId::new("user:1")?;
/// let lease = backend.acquire(&obj, &NodeId::new("node-a")?, Duration::from_secs(10)).await?;
/// backend.put(&obj, lease.token, "User", "name", "Ada".into()).await?;
/// assert_eq!(backend.get(&obj, "name").await?.as_deref(), Some(&b"Ada"[..]));
/// # Ok::<(), dotdo_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    state: Arc<Mutex<State>>,
    clock: Arc<dyn Clock>,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    /// A new empty backend on the system clock.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock::new()))
    }

    /// A new empty backend reading time from `clock`.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        MemoryBackend { state: Arc::new(Mutex::new(State::default())), clock }
    }
}

#[async_trait]
impl HotStore for MemoryBackend {
    async fn write(&self, object: &ObjectId, token: FencingToken, batch: WriteBatch) -> Result<WriteReceipt> {
        batch.validate()?;
        // The write time once the state is this call's (see `acquire`): changes then carry
        // times in the order of their sequence numbers.
        let mut st = self.state.lock();
        let now = self.clock.now();
        let (last, _) = st.seqs(object);
        st.check_token(object, token)?;
        crate::record::receipt_after(last, batch.ops.len() as u64)?;
        let o = st.raise(object, token);
        let first_seq = o.last_seq + 1;
        for op in batch.ops {
            o.last_seq += 1;
            let seq = o.last_seq;
            let (key, op, value) = match op {
                WriteOp::Put { key, value } => (key, Op::Put, value),
                WriteOp::Delete { key } => (key, Op::Delete, Bytes::new()),
            };
            if let Some(old) = o.entries.remove(&key) {
                o.value_bytes -= old.value.len() as u64;
            }
            if op == Op::Put {
                o.value_bytes += value.len() as u64;
                o.entries.insert(key.clone(), Entry { key: key.clone(), value: value.clone(), seq });
            }
            o.log.insert(
                seq,
                ChangeRecord {
                    object: object.clone(),
                    seq,
                    key,
                    op,
                    value,
                    token,
                    timestamp: now,
                    type_name: batch.type_name.clone(),
                },
            );
        }
        Ok(WriteReceipt { first_seq, last_seq: o.last_seq })
    }

    async fn get(&self, object: &ObjectId, key: &str) -> Result<Option<Bytes>> {
        crate::ids::validate_key(key)?;
        let st = self.state.lock();
        Ok(st.objects.get(object).and_then(|o| o.entries.get(key)).map(|e| e.value.clone()))
    }

    async fn list(&self, object: &ObjectId, range: KeyRange, limit: Option<usize>) -> Result<Vec<Entry>> {
        let st = self.state.lock();
        let Some(o) = st.objects.get(object) else { return Ok(Vec::new()) };
        if range.is_empty() {
            // An inverted or empty range selects nothing (BTreeMap::range would panic on it).
            return Ok(Vec::new());
        }
        let it = o.entries.range::<str, _>(range.as_bounds()).map(|(_, e)| e.clone());
        Ok(match limit {
            Some(n) => it.take(n).collect(),
            None => it.collect(),
        })
    }

    async fn read_changes(&self, object: &ObjectId, after: Seq, limit: usize) -> Result<Vec<ChangeRecord>> {
        let st = self.state.lock();
        let Some(o) = st.objects.get(object) else { return Ok(Vec::new()) };
        // At most READ_CHANGES_BYTES of values (at least one change), as the SQL stores: a
        // drain's byte bound rests on it.
        let mut bytes = 0usize;
        Ok(o.log
            .range(after.saturating_add(1)..)
            .take(limit)
            .enumerate()
            .take_while(|(i, (_, r))| {
                bytes = bytes.saturating_add(r.value.len());
                *i == 0 || bytes <= crate::sql_schema::READ_CHANGES_BYTES
            })
            .map(|(_, (_, r))| r.clone())
            .collect())
    }

    async fn truncate_changes(&self, object: &ObjectId, token: FencingToken, through: Seq) -> Result<()> {
        let mut st = self.state.lock();
        st.check_token(object, token)?;
        let (last, _) = st.seqs(object);
        if through > last {
            return Err(Error::invalid(format!("cannot truncate {object} through seq {through}: last seq is {last}")));
        }
        let o = st.raise(object, token);
        o.log = o.log.split_off(&(through + 1));
        o.truncated_through = o.truncated_through.max(through);
        Ok(())
    }

    async fn object_info(&self, object: &ObjectId) -> Result<Option<ObjectInfo>> {
        let st = self.state.lock();
        let max_token = st.max_token(object);
        // As the SQL backends: an object with neither a sequence number nor state is not one yet.
        Ok(st.objects.get(object).filter(|o| o.last_seq > 0 || !o.entries.is_empty()).map(|o| ObjectInfo {
            last_seq: o.last_seq,
            truncated_through: o.truncated_through,
            max_token,
            keys: o.entries.len() as u64,
            value_bytes: o.value_bytes,
            resident: !o.evicted,
        }))
    }

    async fn objects_with_pending_changes(&self, after: Option<&ObjectId>, limit: usize) -> Result<Vec<ObjectId>> {
        use std::ops::Bound;
        let st = self.state.lock();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(st
            .objects
            .range::<ObjectId, _>((from, Bound::Unbounded))
            .filter(|(_, o)| o.last_seq > o.truncated_through)
            .map(|(id, _)| id.clone())
            .take(limit)
            .collect())
    }

    async fn evict(&self, object: &ObjectId, token: FencingToken) -> Result<()> {
        let mut st = self.state.lock();
        st.check_token(object, token)?;
        let (last, truncated) = st.seqs(object);
        if last > truncated {
            return Err(Error::new(
                crate::ErrorKind::Conflict,
                format!("{object} has changes {}..={last} not yet in cold storage", truncated + 1),
            ));
        }
        let o = st.raise(object, token);
        o.entries.clear();
        o.value_bytes = 0;
        // (An object never written has nothing in cold to restore: not marked, as the runtime
        // never restores it.)
        o.evicted = last > 0;
        Ok(())
    }

    async fn restore(
        &self,
        object: &ObjectId,
        token: FencingToken,
        entries: Vec<Entry>,
        through_seq: Seq,
    ) -> Result<()> {
        // The token first, as the SQL backends check it.
        token.validate()?;
        crate::record::validate_restore(&entries, through_seq)?;
        let mut st = self.state.lock();
        st.check_token(object, token)?;
        let (last, truncated) = st.seqs(object);
        if last > through_seq {
            return Err(crate::record::restore_behind_hot(object, through_seq, Some(last)));
        }
        if last > truncated {
            return Err(Error::new(
                crate::ErrorKind::Conflict,
                format!(
                    "cannot restore {object} through seq {through_seq}: hot last seq {last} (truncated through {truncated})"
                ),
            ));
        }
        let o = st.raise(object, token);
        o.entries = entries.into_iter().map(|e| (e.key.clone(), e)).collect();
        o.value_bytes = o.entries.values().map(|e| e.value.len() as u64).sum();
        o.last_seq = through_seq;
        o.truncated_through = through_seq;
        o.log.clear();
        o.evicted = false;
        Ok(())
    }
}

#[async_trait]
impl ConsistencyGuard for MemoryBackend {
    async fn acquire(&self, object: &ObjectId, holder: &NodeId, ttl: Duration) -> Result<Lease> {
        // The time is read once the state is this call's, as the SQL stores read it inside their
        // transaction: read before waiting for the lock, a refresh or validate queued behind a
        // long write decided with a time from before the wait.
        let mut st = self.state.lock();
        let now = self.clock.now();
        let mut row = rules::acquire(object, st.leases.get(object), holder, ttl, now)?;
        // A token must also exceed any token writes have presented.
        let floor = st.max_token(object);
        if row.token <= floor {
            row.token = floor.checked_next()?;
        }
        let lease = row.to_lease(object);
        st.leases.insert(object.clone(), row);
        Ok(lease)
    }

    async fn refresh(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        crate::guard::validate_ttl(ttl)?;
        let mut st = self.state.lock();
        let now = self.clock.now();
        rules::check_current(lease, st.leases.get(&lease.object), now)?;
        let row = st.leases.get_mut(&lease.object).ok_or_else(|| Error::backend("lease row vanished"))?;
        row.expires_at = now.plus(ttl);
        Ok(row.to_lease(&lease.object))
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let mut st = self.state.lock();
        if let Some(row) = st.leases.get_mut(&lease.object) {
            // Also a lease this node's clock sees ended: another node's clock may be behind.
            if row.token == lease.token && row.expires_at > crate::guard::rules::RELEASED {
                row.expires_at = crate::guard::rules::RELEASED;
            }
        }
        Ok(())
    }

    async fn validate(&self, lease: &Lease) -> Result<()> {
        let st = self.state.lock();
        let now = self.clock.now();
        rules::check_current(lease, st.leases.get(&lease.object), now)
    }

    async fn current(&self, object: &ObjectId) -> Result<Option<Lease>> {
        let st = self.state.lock();
        let now = self.clock.now();
        Ok(st.leases.get(object).filter(|r| now < r.expires_at).map(|r| r.to_lease(object)))
    }
}
