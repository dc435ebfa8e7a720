//! # dotdo-libsql
//!
//! [`HotStore`](dotdo_core::HotStore) and [`ConsistencyGuard`](dotdo_core::ConsistencyGuard) on
//! [libSQL](https://docs.rs/libsql) — what to reach for when one machine is not enough: a Turso /
//! sqld primary that many nodes share, optionally with embedded replicas for local reads.
//!
//! One store type, one code path, three ways to open the database:
//!
//! | builder | where the SQL runs | feature |
//! |---|---|---|
//! | [`LibsqlStore::local`]`(path)` | a local libSQL file, in process | (always) |
//! | [`LibsqlStore::remote`]`(url, token)` | a remote primary over HTTP(S) (Hrana) | `remote` (default) |
//! | [`LibsqlStore::replica`]`(path, url, token, sync_interval)` | reads: the local replica file; writes and lease calls: the primary | `replica` |
//!
//! The default features are `remote`; `default-features = false` builds the local file mode only
//! (no HTTP stack). `replica` adds libsql's replication client (gRPC, tonic).
//!
//! Tested: the conformance kit runs on a local file with prepared statements, on a local file with
//! every program rendered as one batch (the remote path), and in remote mode through libsql's own
//! HTTP client against a minimal Hrana server in the tests. The replica mode is built by the test
//! command (`scripts/test` runs `cargo test -p dotdo-libsql --features replica --lib --test
//! errors_and_modes`: configuration checks, an unreachable primary, and the connection settings
//! of a real local replica file); running it against data needs a real sqld / Turso primary,
//! which the test suite does not have.
//!
//! ## Semantics (the same as dotdo-sqlite)
//!
//! * Same schema as dotdo-sqlite: `do_locks` (the lease table), `do_objects` (per-object counters
//!   with the `last_seq` floor and the token maximum), `do_state`, `do_changes`, `do_evicted`
//!   (objects evicted and not restored since).
//! * **The fencing check and the write are one transaction on the primary.** Every mutating call
//!   (`write`, `truncate_changes`, `evict`, `restore`, `acquire`, `refresh`, `release`) is one
//!   *program*: statements whose effect is conditional on the token check (e.g. fold the lease's
//!   token into the object's token maximum, raise it if the token is newer, apply each operation
//!   only if the token equals the maximum), then one integer result (the last sequence number, or
//!   `-current_token` when fenced). It runs as one `BEGIN IMMEDIATE` … `COMMIT` transaction (on a
//!   local file, a call of one statement, such as an acquire or a release, runs as that statement
//!   alone). Against a remote primary the
//!   whole transaction is sent as **one batch in one HTTP round trip**, never check-then-write.
//!   libsql's remote batches return no rows, so the result comes back as the batch's
//!   `last_insert_rowid`: inside the transaction a `do_locks` row with a negative rowid that
//!   encodes the result (and a per-call nonce, so a stale value is detected) is inserted and
//!   deleted again; nothing of it is committed. (This relies on the primary reporting the
//!   connection's `last_insert_rowid` with the batch's last step, as the Hrana protocol's step
//!   results carry it; a primary that does not is detected by the nonce and reported as
//!   `AmbiguousOutcome` for a write, since its batch ran through the `COMMIT` (`Unavailable`
//!   for a read), never as a wrong result.) An embedded replica's possibly stale local copy is
//!   never consulted for the check, so a stale read cannot let a stale token write.
//! * A remote URL must name the **primary** (or a proxy that sends every request to it): remote
//!   reads (`get`, `list`, `validate`, `read_changes`) run on pooled streams of their own, and
//!   libsql 0.10's client sends no replication index, so a read served by a sqld replica or an
//!   edge node may miss writes this store already acknowledged. Fencing is unaffected (every
//!   mutating program runs on the server the URL names, in one transaction).
//! * The lease decision is the SQL form of [`dotdo_core::guard::rules`] (free iff
//!   `expires_at <= now`; token = 1 + max(previous token, object's token maximum)). An acquire
//!   writes the lease row alone: an object's fencing floor is the larger of its lease's token and
//!   its token maximum, and every fenced call checks both (programs raise the maximum to the
//!   lease's token first; a local write reads both). A refusal is
//!   explained by reading the row on the primary and applying `rules` itself (`LeaseHeld`,
//!   `LeaseLost`, `Fenced`).
//! * Reads are cached prepared statements (an embedded replica's are prepared for each call).
//!   Remotely libsql describes a statement once per connection (one extra round trip the first
//!   time), then each read is one round trip. A remote primary's answers have a size limit
//!   (sqld's `max_response_size`, 10 MB by default): listings and change reads are read in
//!   pages of at most 8 MiB of estimated answer, a listing of several pages inside one read
//!   transaction. A primary that refuses a page as too large (run with a lower
//!   `--max-response-size`, or its total of answers in flight passed) halves the store's page
//!   bound (down to 64 KiB) and the read is retried; after 32 reads in a row at a smaller bound
//!   that carried at least half of it, it is doubled again.
//! * Calls on a local file run SQLite on the calling thread (libsql's local API is synchronous
//!   inside its async functions); on a multi-threaded tokio runtime they run under
//!   `block_in_place`, so a call waiting on a lock does not stall the worker's other tasks.
//!   Remote calls are truly asynchronous (and need a tokio runtime, as libsql's HTTP client does).
//! * Connections are kept and reused (one write connection, a small pool of read connections;
//!   each remote one keeps its own keep-alive HTTP connection, as libsql builds an HTTP client
//!   per connection: a connection replaced after an error costs a new TLS handshake). Writes
//!   reuse it always. Reads may not: sqld streams a read's answer (chunked) and libsql 0.10's
//!   client stops reading at the statement's end, before the answer's final chunk when that
//!   arrives a moment later; hyper then closes the HTTP connection, and the next read opens
//!   another (TCP, and TLS for `https://`). With a test server streaming as sqld does, the
//!   final chunk 5 ms after the entries, ten reads opened ten connections (one when the answer
//!   has a known length). dotdo cannot read past the end libsql gives it; a fix belongs in
//!   libsql (reading the cursor's answer to its end).
//! * Transient failures (busy database, unreachable or overloaded primary) are retried a bounded
//!   number of times with doubling, jittered backoff (real time, whatever clock is injected), then reported as a retryable
//!   `Unavailable`. A mutating call whose request may have reached the primary before the
//!   connection broke, or that got an HTTP 5xx answer (503 included: a proxy answers it also
//!   after forwarding the request; only a 408 or 429 says it was refused unprocessed), is **not**
//!   retried blindly: it fails with `AmbiguousOutcome` (`release` and the schema
//!   program, which are safe to repeat, are retried first; a release whose every attempt ended
//!   so is `AmbiguousOutcome` too); so does one whose batch failed at a step
//!   that may follow its `COMMIT` (a lock timeout, disk full or I/O error, or sqld's own
//!   refusals: a transaction timed out, too many transactions, a blocked operation), and a local
//!   `COMMIT` that failed with an I/O error (WAL recovery may still apply it). Reading back
//!   does not settle a write: the request may still be queued at the primary and land later.
//!   Take a new lease (a higher token) before writing the object again, so that a late write is
//!   fenced; `ObjectRuntime` does so itself. A rejected auth token is a non-retryable `Backend`
//!   error that says so.
//! * Durability on a local file is a setting ([`Durability`]): `Normal` (default, WAL +
//!   `synchronous=NORMAL`) survives a process crash or SIGKILL; `Full` also survives power loss.
//!   A local database that cannot run in WAL mode (a VFS without shared memory, an `immutable`
//!   file) is refused with `InvalidInput`, as by dotdo-sqlite. Restoring a backup of a local
//!   file has dotdo-sqlite's rules: stop every process using it, and remove (or restore with
//!   the backup) its `-wal` and `-shm` files, or restore through SQLite itself (its backup API,
//!   `VACUUM INTO`): left beside a backup renamed over the file, the old database's WAL is
//!   replayed into it by the next opener. Deleting them under a running store corrupts the file.
//!   On a remote primary, `Ok` means the primary committed (its own durability settings apply).
//! * Replica mode: after each successful write the store pulls the replica, so this store reads
//!   its own writes. Other nodes' writes appear after the next pull (`sync_interval`, or
//!   [`LibsqlStore::sync`]). The reads a decision rests on go to the primary: the guard's
//!   `validate` and `current`, and the drain's reads (`object_info`, pending objects, changes);
//!   and the fencing check of every write runs on the primary. If the pull after
//!   a write (an acquire included) fails, reads pull first until a pull succeeds and fail with
//!   `Unavailable` meanwhile: a replica without the last holder's writes is never read (retryable
//!   when the network failed; not when the primary lacks the namespace (`Backend`) or the
//!   replica file cannot take the frames; libsql reports a token the primary rejects during the
//!   replication handshake as a handshake timeout, so that reads as a retryable `Unavailable`).
//!   Each attempt of a pull, and of building the replica at open, is bounded by
//!   `LibsqlSettings::sync_timeout` (60 s), and a failed attempt is retried up to
//!   `LibsqlSettings::retries` times: at open and before a read the call then fails with a
//!   retryable `Unavailable` (after a write, committed on the primary, the write returns and
//!   the next read pulls first). An attempt that times out is not retried: its pull goes on in
//!   the background, and the next pull waits for it (within that pull's own `sync_timeout`).
//!   Pulls run one at a time per store, and each write (an acquire included; a lease refresh
//!   or release changes nothing a replica read sees: lease reads go to the primary) waits for
//!   its own: a store's write rate in replica mode is bounded by the pull's round trips.
//!   [`LibsqlStore::sync`] pulls on demand; once it succeeds, reads need not pull first. Read-your-writes holds when the replication endpoint is
//!   the primary (a pull catches up to the primary's position at its handshake); a lagging edge
//!   endpoint can answer a pull without the store's own last write.
//!
//! ## Configuration
//!
//! ```text
//! # local file (default features are enough; the crates are not on crates.io: a path or git
//! # dependency on a checkout, see the repository's README)
//! dotdo-libsql = { path = "../dotdo/dotdo-libsql" }
//! LibsqlStore::local("/var/lib/app/hot.db").open().await?
//!
//! # Turso / sqld primary
//! let token = std::env::var("TURSO_AUTH_TOKEN")
//!     .map_err(|e| dotdo_core::Error::invalid(format!("TURSO_AUTH_TOKEN: {e}")))?;
//! LibsqlStore::remote("libsql://my-db-my-org.turso.io", token.clone()).open().await?
//! LibsqlStore::remote("http://127.0.0.1:8080", "").open().await?        # sqld without auth
//!
//! # embedded replica (features = ["replica"])
//! LibsqlStore::replica("/var/lib/app/replica.db", "libsql://my-db-my-org.turso.io", token,
//!                      Some(Duration::from_secs(1))).open().await?
//! ```
//!
//! URLs must be `libsql://`, `https://` or `http://` with a host, no credentials and no query or
//! fragment (pass the token as `AuthToken`, never `?authToken=`); an auth token must be visible
//! ASCII, at most 16 KiB. Anything else is `InvalidInput` before any I/O. The token is redacted in
//! every `Debug` output. TLS (`libsql://`, `https://`) trusts the platform's root certificates,
//! read from `SSL_CERT_FILE` / `SSL_CERT_DIR` when set; if none can be loaded, `open` is a
//! non-retryable `Backend` error naming them. A plain `http://` primary needs none. The token
//! travels in every request's `Authorization` header: over `http://` it is sent in the clear, so
//! use plain HTTP only on a loopback or otherwise private link.
//!
//! ## Do not link libsql and rusqlite into one binary
//!
//! libsql's `core` feature bundles its own SQLite (libsql-ffi) under the same C symbol names as
//! rusqlite's bundled SQLite (`sqlite3_open_v2`, …). A binary that links both either fails with
//! duplicate symbols or, worse, links and then misbehaves at run time (one library's calls land in
//! the other's SQLite; SQLite panics on its threading configuration). Therefore:
//!
//! * **valid:** a binary with `dotdo-libsql` (any of its features) and `dotdo-core` and other
//!   crates that do not link SQLite;
//! * **valid:** a binary with `dotdo-sqlite` and no `dotdo-libsql`;
//! * **valid:** `dotdo-libsql` with `dotdo-iceberg` built without its SQL catalog
//!   (`default-features = false, features = ["s3", "rest"]`): a REST, memory or custom catalog
//!   (`tests-libsql-iceberg/` runs the object runtime on the two);
//! * **invalid:** `dotdo-libsql` together with `dotdo-sqlite`, `rusqlite` (bundled or system),
//!   `dotdo-iceberg` with its `sql` feature (default: its SQL catalog pulls `libsqlite3-sys`
//!   through sqlx) or `dotdo-pipelines` (its buffers use rusqlite with bundled SQLite) in one
//!   binary.
//!
//! This crate depends on none of them, not even as a dev-dependency, so its tests, benchmarks and
//! doctests are single-flavoured. Note that cargo unifies a crate's features across a
//! workspace's members: a workspace where any member turns dotdo-iceberg's `sql` on builds every
//! binary with it; put the libSQL + Iceberg binary in a workspace (or build) of its own.
//!
//! ## Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> dotdo_core::Result<()> {
//! use std::time::Duration;
//! use dotdo_core::{ConsistencyGuard, HotStore, HotStoreExt, NodeId, ObjectId};
//! use dotdo_libsql::{Durability, LibsqlSettings, LibsqlStore};
//!
//! let dir = tempfile::tempdir().expect("tempdir");
//! let store = LibsqlStore::local(dir.path().join("hot.db"))
//!     .with_settings(LibsqlSettings { durability: Durability::Full, ..Default::default() })
//!     .open()
//!     .await?;
//! let obj = ObjectId::new("cart:42")?;
//! let lease = store.acquire(&obj, &NodeId::new("node-a")?, Duration::from_secs(5)).await?;
//! store.put(&obj, lease.token, "Cart", "items", "[]".into()).await?;
//! assert_eq!(store.read_changes(&obj, 0, 100).await?.len(), 1);
//!
//! // A newer holder fences the old one out, in storage.
//! store.release(&lease).await?;
//! let newer = store.acquire(&obj, &NodeId::new("node-b")?, Duration::from_secs(5)).await?;
//! store.put(&obj, newer.token, "Cart", "items", "[1]".into()).await?;
//! let stale = store.put(&obj, lease.token, "Cart", "items", "[]".into()).await.unwrap_err();
//! assert!(stale.is_fenced());
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod checkpoint;
mod conn;
mod error;
mod hot;
mod lease;
mod schema;
mod settings;
mod sql;
mod store;

pub use settings::{validate_url, AuthToken, Durability, LibsqlSettings, Target, Transport, MAX_BACKOFF, MAX_RETRIES};
pub use store::{LibsqlStore, LibsqlStoreBuilder};

/// The most bytes of values one `read_changes` returns (at least one change whatever its size),
/// on a local file as on a remote primary, where the answer must also arrive within
/// `request_timeout`; a drain reads on until the log is empty. The same bound as dotdo-sqlite's
/// ([`dotdo_core::sql_schema::READ_CHANGES_BYTES`]).
pub const REMOTE_CHANGES_BYTES: usize = dotdo_core::sql_schema::READ_CHANGES_BYTES;
