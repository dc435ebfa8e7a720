//! In-memory reference backends with exactly the specified semantics.
//!
//! * [`MemoryBackend`] implements [`HotStore`](crate::HotStore) and
//!   [`ConsistencyGuard`](crate::ConsistencyGuard) over one shared state, so the token check of a
//!   write sees the leases the guard issued (like a SQL backend keeping both in one database).
//! * [`MemoryColdStore`] implements [`ColdSink`](crate::ColdSink) and
//!   [`IndexAccelerator`](crate::IndexAccelerator) with immutable snapshots.
//!
//! They back the doctests and examples, and are the model the property tests compare real
//! backends against. Nothing survives the process.

mod cold;
mod hot;

pub use cold::MemoryColdStore;
pub use hot::MemoryBackend;
