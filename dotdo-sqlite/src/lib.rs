//! # dotdo-sqlite
//!
//! The embedded default hot store of dotdo: [`HotStore`](dotdo_core::HotStore) and
//! [`ConsistencyGuard`](dotdo_core::ConsistencyGuard) on one SQLite database file (rusqlite with
//! bundled SQLite: 3.54.1 through the workspace's `[patch.crates-io]` of libsqlite3-sys, see
//! `vendor/libsqlite3-sys/VENDORED.md`; a dependent needs the same patch, or it links the 3.46.0
//! of libsqlite3-sys 0.30.1, which has SQLite's WAL-reset bug, and `open` refuses with
//! `InvalidInput` unless `SqliteSettings::background_checkpoint` is `None` or zero:
//! docs/durability.md).
//!
//! * The lease table `do_locks` (`do_id, node_id, acquired_at, expires_at, fencing_token,
//!   metadata`), per-object counters, state and the change log live in one database, so the
//!   fencing check and the write are **one transaction**. Tokens never repeat or go down, also
//!   across restarts and lease expiry (after a power loss or OS crash only with
//!   `Durability::Full`: under `Normal` the last acquires may be lost and a token issued again).
//! * WAL mode. Durability is a setting ([`Durability`]): `Normal` (default) survives a process
//!   crash or SIGKILL; `Full` also survives power loss, at the cost of an fsync per commit.
//! * Many threads and OS processes may share a file; writers serialize on SQLite's write lock with
//!   a busy timeout and bounded retries, and report a retryable `Unavailable` instead of hanging.
//! * With the default [`Execution::Auto`], async calls do not stall a tokio executor's other
//!   tasks (see [`Execution`]).
//! * A file that is not a healthy SQLite database gives `Corrupt`, never a panic; so does a file
//!   at dotdo's schema version without dotdo's tables, and, within a background checkpoint
//!   period, a file deleted or replaced by another file (a restored backup renamed or moved over
//!   it) while the store has it open (SQLite does not notice that in WAL mode; needs
//!   `background_checkpoint`). A backup copied *into* the open file (`cp backup.db hot.db`, the
//!   same inode) is not detected and mixes the two databases' pages, and a backup renamed over
//!   it is refused by the store that had it open (within a background checkpoint period, as
//!   above), but the old database's `-wal` and `-shm` files stay beside it, and the next process
//!   to open it replays the old WAL into the backup: restore only with every process using the
//!   file stopped, removing (or restoring with it) its `-wal` and `-shm` files, or through
//!   SQLite itself (its backup API, `VACUUM INTO`). Deleting the `-wal` and `-shm` files of a
//!   database in use is not detected either, and corrupts it (they are part of a WAL database
//!   until its last connection closes). Another application's database (`user_version` 0 with
//!   tables of its own) is `InvalidInput` and left untouched, and so is a database that cannot
//!   run in WAL mode (a VFS without shared memory).
//!
//! Do not link this crate together with `dotdo-libsql` into one binary: both bundle SQLite
//! under the same C symbol names (see the workspace README).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> dotdo_core::Result<()> {
//! use std::time::Duration;
//! use dotdo_core::{ConsistencyGuard, HotStore, HotStoreExt, NodeId, ObjectId};
//! use dotdo_sqlite::{Durability, SqliteSettings, SqliteStore};
//!
//! let dir = tempfile::tempdir().expect("tempdir");
//! let store = SqliteStore::builder(dir.path().join("hot.db"))
//!     .with_settings(SqliteSettings { durability: Durability::Full, ..Default::default() })
//!     .open()
//!     .await?;
//! let obj = ObjectId::new("cart:42")?;
//! let lease = store.acquire(&obj, &NodeId::new("node-a")?, Duration::from_secs(5)).await?;
//! store.put(&obj, lease.token, "Cart", "items", "[]".into()).await?;
//! let changes = store.read_changes(&obj, 0, 100).await?;
//! assert_eq!(changes.len(), 1);
//! store.release(&lease).await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod error;
mod schema;
mod settings;
mod store;

pub use settings::{Durability, Execution, SqliteSettings};
pub use store::{SqliteStore, SqliteStoreBuilder, MAX_BUSY_RETRIES};
