//! # dotdo-iceberg
//!
//! Cold storage for dotdo on **Apache Iceberg**: a [`ColdSink`](dotdo_core::ColdSink) and
//! [`IndexAccelerator`](dotdo_core::IndexAccelerator) over iceberg-rust 0.10, writing Parquet
//! (ZSTD) to any `object_store` warehouse (`file://`, `memory://`, `s3://` incl. R2 and MinIO,
//! `gs://`, `az://`), with the catalog on embedded SQLite by default for a local (`file://`)
//! warehouse (in memory for `memory://`; an object-store warehouse names its catalog). Tables
//! are standard Iceberg v2 (the tests read them with PyIceberg, and their data files with
//! DuckDB's Parquet reader; Spark and Trino are not run here).
//!
//! Features: `s3` and `rest` (default) for S3-compatible warehouses and the REST catalog, `gcs`,
//! `azure`; `sql` (default), the SQL catalog on SQLite, which links SQLite. Without `sql`
//! (`default-features = false, features = ["s3", "rest"]`) the crate links no SQLite and goes in
//! one binary with dotdo-libsql (whose libSQL bundles SQLite under the same symbols); its tables
//! then use a REST, memory or custom catalog, and compaction, collapse and `widen_column`
//! (which commit through the SQL catalog) are refused. `tests-libsql-iceberg/` runs the object
//! runtime on both.
//!
//! ## Why
//!
//! Hot state is small and fast; history and evicted objects belong in cheap object storage, in
//! an open format other engines can query. Cold appends must be **exactly once** and **fenced**
//! like hot writes: a retry, a crash replay or a stale holder must never duplicate, drop or
//! overwrite rows.
//!
//! ## How
//!
//! * **One snapshot per append.** Each [`append`](dotdo_core::ColdSink::append) writes one
//!   Parquet file per touched `bucket(do_id)` partition (more once a file reaches
//!   `Settings::target_file_size`) and commits them with a fast append.
//! * **Watermarks in the snapshot summary.** Every snapshot's summary determines the per-object
//!   watermarks after it (inline JSON plus, beyond 1000 objects or about 64 KiB of inline JSON,
//!   an immutable checkpoint file it names; see [`summary`]), so `watermark()` reads only the current snapshot, and the records
//!   to skip, the gaps to reject and the stale tokens to fence are decided against exactly the
//!   snapshot the commit is based on.
//! * **Optimistic concurrency without blind retries.** iceberg's own commit retry is disabled
//!   (it would rebase onto a newer head without re-checking watermarks). A conflict makes dotdo
//!   reload the table and re-plan; an error of unknown outcome is resolved by reading the table
//!   back and looking for the commit's id (`dotdo.commit-id`) before trying again.
//! * **Time travel** by snapshot id or by time ([`AsOf`](dotdo_core::AsOf)), snapshot expiry and
//!   cleanup of unreferenced files with a retention period ([`maintenance`]).
//! * **Compaction** of small files into a `replace` snapshot, and an explicit **collapse** of
//!   superseded versions ([`compact`]), committed with a conflict check against concurrent
//!   appends, also for user tables ([`ArrowTable::compact`]); **schema evolution** of user
//!   tables ([`ArrowTable::add_column`], [`ArrowTable::widen_column`]).
//!
//! See [`schema`] for the table layout and [`summary`] for what each snapshot records. Every
//! failure is a [`dotdo_core::Error`]: an unreachable store is `Unavailable` (retryable), a missing
//! or undecodable file is `Corrupt` naming the file, with these exceptions: a read of a snapshot
//! that expired while it was read is `NotFound`; a data file in a format other than Parquet
//! (another engine's ORC or Avro) is `Backend`; a file missing while the catalog cannot be read
//! again to tell whether the table moved on is that read's (retryable) error.
//!
//! ## Example
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> dotdo_core::Result<()> {
//! use dotdo_core::{AsOf, ColdBatch, ColdSink, FencingToken, ObjectId};
//! use dotdo_iceberg::IcebergColdStore;
//!
//! let dir = tempfile::tempdir().expect("tempdir");
//! // A local warehouse; the SQLite catalog goes to <dir>/catalog.db.
//! let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8 path"))
//!     .table(["app"], "changes")
//!     .build()
//!     .await?;
//!
//! let obj = ObjectId::new("counter:1")?;
//! let rec = dotdo_core::ChangeRecord {
//!     object: obj.clone(),
//!     seq: 1,
//!     key: "n".into(),
//!     op: dotdo_core::Op::Put,
//!     value: "1".into(),
//!     token: FencingToken::new(1),
//!     timestamp: dotdo_core::Timestamp::from_millis(1),
//!     type_name: "Counter".into(),
//! };
//! let batch = ColdBatch::single(obj.clone(), FencingToken::new(1), vec![rec]);
//! let commit = cold.append(batch.clone()).await?;
//! assert_eq!(commit.records_written, 1);
//! // A replay (after a crash or a lost reply) writes nothing.
//! assert_eq!(cold.append(batch).await?.records_written, 0);
//! let state = cold.load_state(&obj, AsOf::Latest).await?;
//! assert_eq!(&state.entries[0].value[..], b"1");
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod catalog;
mod commit;
pub mod compact;
mod error;
pub mod maintenance;
mod read;
pub mod schema;
pub mod storage;
mod store;
pub mod summary;
pub mod user_table;

pub use catalog::CatalogConfig;
pub use compact::{CollapseOptions, CompactOptions, Progress, ProgressFn, RewriteReport};
pub use maintenance::{CleanupReport, ExpireReport};
pub use storage::StoreRoot;
pub use store::{
    IcebergColdStore, IcebergColdStoreBuilder, Settings, MAX_BUCKETS, MAX_CATALOG_TIMEOUT, MAX_CLEANUP_RETENTION,
    MAX_COMMIT_ATTEMPTS, MIN_BLOOM_FPP, MIN_CLEANUP_PROP,
};
pub use user_table::{ArrowCommit, ArrowTable};
