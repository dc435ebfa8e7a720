//! The [`HotStore`] contract: per-object key/value state with a fenced, atomic write path and a
//! change log that the cold path drains exactly once.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::ids::{FencingToken, ObjectId};
use crate::record::{ChangeRecord, Entry, KeyRange, Seq, WriteBatch, WriteReceipt};

/// What a hot store knows about one object.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ObjectInfo {
    /// The sequence number of the object's last change (0 if never written).
    pub last_seq: Seq,
    /// Changes up to and including this sequence number were acknowledged by cold storage and
    /// may have been truncated from the change log.
    pub truncated_through: Seq,
    /// The highest fencing token this store has seen for the object, including the token of a
    /// lease its co-located guard granted before any write under it.
    pub max_token: FencingToken,
    /// Number of live keys.
    pub keys: u64,
    /// Total bytes of live values.
    pub value_bytes: u64,
    /// Whether the live state here is the object's whole state: true for an object written
    /// here and never evicted, or restored since its last [`evict`](HotStore::evict); false
    /// from an evict of a written object (sequence number above 0) until the next
    /// [`restore`](HotStore::restore) (writes in between do not make it true: hot then holds
    /// only what they wrote). An evict before any write marks nothing (there is nothing in
    /// cold storage to restore). This is what tells an object whose keys were all deleted
    /// (resident, nothing to restore) from an evicted one (its state is in cold storage). The
    /// conformance kit requires it; a backend reporting `false` throughout (not tracking
    /// evictions) fails the kit's eviction cases but is safe with the runtime, which then
    /// restores an object without live keys from cold storage at each activation (which needs
    /// cold storage reachable).
    pub resident: bool,
}

impl ObjectInfo {
    /// Whether there are changes cold storage has not acknowledged yet.
    pub fn has_pending_changes(&self) -> bool {
        self.last_seq > self.truncated_through
    }
}

/// Hot, per-object state.
///
/// # Contract
///
/// * **Fencing.** Every mutating call carries a [`FencingToken`]. The store remembers the highest
///   token it has seen per object (including tokens issued by a co-located
///   [`ConsistencyGuard`](crate::ConsistencyGuard) sharing its database). A call whose token is
///   lower fails with [`ErrorKind::Fenced`](crate::ErrorKind::Fenced) and changes nothing visible
///   (a backend may record the object's newest lease token on the way); a call
///   with a higher token that succeeds raises the remembered maximum, and one refused for
///   another reason (an invalid batch, a truncation beyond the last change, a refused evict or
///   restore) changes nothing, its token included. The check and the write are one atomic
///   step. [`FencingToken::NONE`] is rejected with `InvalidInput`.
/// * **Atomicity and order.** [`write`](HotStore::write) applies a whole batch or nothing. Each
///   operation gets the next per-object sequence number (no gaps, never reused, also after
///   truncation, eviction or restart).
/// * **Durability.** `Ok` from a mutating call means the change survives a crash of the process
///   (each backend documents its durability modes and what they guarantee against power loss).
/// * **Visibility.** A write is visible to every subsequent read through any handle on the same
///   store once the call returned `Ok`.
/// * **Eviction.** [`evict`](HotStore::evict) of a written object marks it evicted
///   ([`ObjectInfo::resident`] false) until a [`restore`](HotStore::restore); the mark survives
///   restarts, as the state does.
/// * **Change log.** Every applied operation appends a [`ChangeRecord`] to the object's change log.
///   [`read_changes`](HotStore::read_changes) returns them in sequence order;
///   [`truncate_changes`](HotStore::truncate_changes) drops them once cold storage acknowledged
///   them.
/// * **Errors.** Bad ids, keys, type names → `InvalidInput`; keys over 1 KiB, values over
///   2 MiB and batches over [`WriteBatch::MAX_BYTES`] or [`WriteBatch::MAX_OPS`] operations →
///   `LimitExceeded`;
///   busy or unreachable backend → `Unavailable` (retryable; not retryable when no retry can
///   mend it: a read-only or unopenable file); damaged storage → `Corrupt`. A mutating call
///   whose outcome is unknown (a COMMIT that failed with an I/O error, a remote primary's reply
///   lost after the request was sent) → `AmbiguousOutcome`: it may have applied, also later
///   (a remote primary runs a request whose reply was lost on to its end). Never retry such a
///   write, nor write anything else, under the same token (the write could land after a later
///   one and overwrite it): take a new lease (whose token fences the write if it lands late)
///   and read back. A call whose future is dropped before it returns (a timeout
///   around it) has an unknown outcome too: work already under way (a blocking thread, a
///   request sent) may still apply. dotdo-sqlite begins and commits nothing for a caller that
///   has given up (one dropped during its COMMIT cannot be told apart); a request already sent
///   to a remote primary runs on.
#[async_trait]
pub trait HotStore: Send + Sync + Debug + 'static {
    /// Apply `batch` to `object` atomically under `token`. An empty batch still checks (and
    /// raises) the token and returns a receipt with `first_seq == last_seq + 1`.
    async fn write(&self, object: &ObjectId, token: FencingToken, batch: WriteBatch) -> Result<WriteReceipt>;

    /// The current value of `key`, or `None`.
    async fn get(&self, object: &ObjectId, key: &str) -> Result<Option<Bytes>>;

    /// Live entries with keys in `range`, in key order, at most `limit` if given.
    async fn list(&self, object: &ObjectId, range: KeyRange, limit: Option<usize>) -> Result<Vec<Entry>>;

    /// Change records with `seq > after`, in order, at most `limit`. A backend may return fewer
    /// while more exist: read on after the last one returned until an empty answer. It should
    /// bound an answer's bytes, as the SQL stores and the memory reference do (at most
    /// [`READ_CHANGES_BYTES`](crate::sql_schema::READ_CHANGES_BYTES) of values, at least one
    /// change): the runtime asks for up to `flush_batch_records` changes at once and holds an
    /// answer whole before cutting it to `flush_batch_bytes`, so a backend answering `limit`
    /// changes whatever their size makes a drain hold that many.
    async fn read_changes(&self, object: &ObjectId, after: Seq, limit: usize) -> Result<Vec<ChangeRecord>>;

    /// Drop change records with `seq <= through` (cold storage has them). Idempotent. Fenced like a
    /// write. `through` beyond the last sequence number (0 for an object never written) is
    /// `InvalidInput` naming the last sequence number.
    async fn truncate_changes(&self, object: &ObjectId, token: FencingToken, through: Seq) -> Result<()>;

    /// What the store knows about `object`; `None` while it has neither a sequence number nor
    /// state: never written or restored, or only by empty writes and restores at 0 (which may
    /// still have raised its token, see the fencing rules above).
    async fn object_info(&self, object: &ObjectId) -> Result<Option<ObjectInfo>>;

    /// Objects with untruncated changes, in id order, at most `limit`, starting after `after`.
    async fn objects_with_pending_changes(&self, after: Option<&ObjectId>, limit: usize) -> Result<Vec<ObjectId>>;

    /// Drop the object's live state (tiering out). Fails with `Conflict` if the change log still
    /// holds changes cold storage has not acknowledged, so nothing acknowledged is lost. The
    /// sequence number and the token maximum are kept, so sequence numbers never repeat.
    async fn evict(&self, object: &ObjectId, token: FencingToken) -> Result<()>;

    /// Install state recovered from cold storage: replaces the object's live state with `entries`
    /// and sets its sequence number to `through_seq` without logging changes (they are already
    /// cold). Fails with `Conflict` if the object has pending changes (retryable: once they are
    /// in cold storage and truncated, the restore can succeed) or a `last_seq` above
    /// `through_seq` (not retryable: the state offered is older than the object's,
    /// [`restore_behind_hot`](crate::record::restore_behind_hot)), and (before writing
    /// anything) with `LimitExceeded` if an entry's key or
    /// value is over its size limit, `InvalidInput` if a key is otherwise invalid, a key appears
    /// twice or an entry's seq is above `through_seq`
    /// ([`validate_restore`](crate::record::validate_restore)).
    async fn restore(
        &self,
        object: &ObjectId,
        token: FencingToken,
        entries: Vec<Entry>,
        through_seq: Seq,
    ) -> Result<()>;
}

#[async_trait]
impl<T: HotStore + ?Sized> HotStore for Arc<T> {
    async fn write(&self, object: &ObjectId, token: FencingToken, batch: WriteBatch) -> Result<WriteReceipt> {
        (**self).write(object, token, batch).await
    }
    async fn get(&self, object: &ObjectId, key: &str) -> Result<Option<Bytes>> {
        (**self).get(object, key).await
    }
    async fn list(&self, object: &ObjectId, range: KeyRange, limit: Option<usize>) -> Result<Vec<Entry>> {
        (**self).list(object, range, limit).await
    }
    async fn read_changes(&self, object: &ObjectId, after: Seq, limit: usize) -> Result<Vec<ChangeRecord>> {
        (**self).read_changes(object, after, limit).await
    }
    async fn truncate_changes(&self, object: &ObjectId, token: FencingToken, through: Seq) -> Result<()> {
        (**self).truncate_changes(object, token, through).await
    }
    async fn object_info(&self, object: &ObjectId) -> Result<Option<ObjectInfo>> {
        (**self).object_info(object).await
    }
    async fn objects_with_pending_changes(&self, after: Option<&ObjectId>, limit: usize) -> Result<Vec<ObjectId>> {
        (**self).objects_with_pending_changes(after, limit).await
    }
    async fn evict(&self, object: &ObjectId, token: FencingToken) -> Result<()> {
        (**self).evict(object, token).await
    }
    async fn restore(
        &self,
        object: &ObjectId,
        token: FencingToken,
        entries: Vec<Entry>,
        through_seq: Seq,
    ) -> Result<()> {
        (**self).restore(object, token, entries, through_seq).await
    }
}

/// Conveniences over [`HotStore`], available on every implementation.
#[async_trait]
pub trait HotStoreExt: HotStore {
    /// Put one key.
    async fn put(
        &self,
        object: &ObjectId,
        token: FencingToken,
        type_name: &str,
        key: &str,
        value: Bytes,
    ) -> Result<WriteReceipt> {
        self.write(object, token, WriteBatch::new(type_name).put(key, value)).await
    }

    /// Delete one key.
    async fn delete(&self, object: &ObjectId, token: FencingToken, type_name: &str, key: &str) -> Result<WriteReceipt> {
        self.write(object, token, WriteBatch::new(type_name).delete(key)).await
    }
}

impl<T: HotStore + ?Sized> HotStoreExt for T {}
