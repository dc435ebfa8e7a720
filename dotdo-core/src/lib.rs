//! # dotdo-core
//!
//! Contracts and building blocks for **stateless durable objects**: objects named by an id whose
//! code can run on any node because their state lives outside the process.
//!
//! * [`HotStore`]: per-object key/value state with fenced atomic batches and a change log;
//! * [`ConsistencyGuard`]: leases with TTL and strictly increasing [`FencingToken`]s;
//! * [`ColdSink`]: exactly-once, fenced appends of change records to cold storage (Iceberg);
//! * [`IndexAccelerator`]: point lookups and scans over cold state, with pruning statistics;
//! * [`HashRing`]: consistent hashing for routing-affinity hints;
//! * [`ObjectRuntime`]: the stateless object runtime a host calls (leases, fenced commits,
//!   recovery, draining to cold storage, tiering) — see [`runtime`];
//! * [`Clock`]: injectable time ([`SystemClock`], [`ManualClock`]);
//! * [`Error`]: one error type whose [`ErrorKind`] tells the caller what to do.
//!
//! The crate depends on no async runtime and no storage engine. Backends live in their own crates
//! (`dotdo-sqlite`, `dotdo-libsql`, `dotdo-iceberg`); the in-memory reference backends
//! ([`MemoryBackend`], [`MemoryColdStore`]) implement the contracts exactly and serve as the model
//! in property tests. The `testkit` feature exposes the conformance kit that every backend runs;
//! `arrow` the Arrow helpers the Arrow-speaking crates share (modules `arrow_size`,
//! `arrow_shape`).
//!
//! ## Why
//!
//! A durable object's code must be free to run anywhere, yet two copies must never both write its
//! state. Every write therefore carries the fencing token of the lease it was made under, and the
//! storage itself rejects a token lower than the highest it has seen: a paused or partitioned
//! former holder gets [`ErrorKind::Fenced`] instead of silently overwriting newer state.
//!
//! ## Example
//!
//! ```
//! # futures::executor::block_on(async {
//! use std::time::Duration;
//! use dotdo_core::*;
//!
//! let hot = MemoryBackend::new(); // HotStore + ConsistencyGuard
//! let obj = ObjectId::new("counter:1")?;
//!
//! let a = hot.acquire(&obj, &NodeId::new("node-a")?, Duration::from_millis(1)).await?;
//! hot.put(&obj, a.token, "Counter", "n", "1".into()).await?;
//!
//! // node-a stalls past its TTL; node-b takes over with a higher token...
//! std::thread::sleep(Duration::from_millis(2));
//! let b = hot.acquire(&obj, &NodeId::new("node-b")?, Duration::from_secs(10)).await?;
//! assert!(b.token > a.token);
//! hot.put(&obj, b.token, "Counter", "n", "2".into()).await?;
//!
//! // ...and node-a's late write is rejected by the store itself.
//! let err = hot.put(&obj, a.token, "Counter", "n", "stale".into()).await.unwrap_err();
//! assert!(err.is_fenced());
//! assert_eq!(hot.get(&obj, "n").await?.as_deref(), Some(&b"2"[..]));
//! # Ok::<(), Error>(())
//! # }).unwrap();
//! ```
#![warn(missing_docs)]

pub mod accel;
#[cfg(feature = "arrow")]
pub mod arrow_shape;
#[cfg(feature = "arrow")]
pub mod arrow_size;
pub mod cold;
pub mod error;
pub mod guard;
pub mod hot;
pub mod ids;
pub mod memory;
pub mod record;
pub mod retry;
pub mod ring;
pub mod runtime;
pub mod sql_schema;
pub mod time;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use accel::{IndexAccelerator, Lookup, QueryStats, Scan, ScanQuery, VersionedValue};
pub use cold::{AsOf, ColdBatch, ColdCommit, ColdSink, ColdState, ObjectChanges, SnapshotId, SnapshotInfo, Watermark};
pub use error::{BoxError, Error, ErrorKind, Result};
pub use guard::{ConsistencyGuard, Lease};
pub use hot::{HotStore, HotStoreExt, ObjectInfo};
pub use ids::{FencingToken, NodeId, ObjectId, MAX_KEY_BYTES, MAX_TYPE_NAME_BYTES, MAX_VALUE_BYTES};
pub use memory::{MemoryBackend, MemoryColdStore};
pub use record::{ChangeRecord, Entry, KeyRange, Op, Seq, WriteBatch, WriteOp, WriteReceipt, MAX_SEQ};
pub use ring::HashRing;
pub use runtime::{ObjectRuntime, ObjectTxn, RestoreMode, RuntimeSettings};
pub use time::{Clock, ManualClock, SystemClock, Timestamp};
