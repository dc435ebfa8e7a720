//! # dotdo-pipelines
//!
//! The batched streaming write path into cold storage. `send(events)` is cheap enough to call on
//! every state change; events wait in a bounded buffer that **rolls** by interval, rows or bytes
//! (and once half full)
//! into one cold commit per claimed batch (at most `roll_rows` events) and route — larger
//! files and far fewer commits than per-event writes —
//! through the same [`ColdSink`](dotdo_core::ColdSink) commit path as the direct writer
//! (`dotdo-iceberg`), exactly once.
//!
//! * **Buffers**: in memory, or durable ([`Durability::Durable`]): a local SQLite log where an
//!   acknowledged `send` survives a process kill and is delivered after restart. A durable (or
//!   spilling) log's SQLite work runs on the calling thread, also inside the async `roll`,
//!   `close` and `take_refused` (a claim's fully synced commit; a wait of up to a few seconds
//!   while another connection, such as a backup tool, holds the log's lock): run the pipelines
//!   on a multi-thread runtime, where one such wait holds up one worker, not every task. A log
//!   file deleted, or replaced by another file, while its pipeline has it open (SQLite does not
//!   notice that in WAL mode, and went on writing to the unlinked file) makes every later send,
//!   roll and `take_refused` `Corrupt` naming the file (a send racing the replacement is not
//!   seen; a spill log's file is not watched). An I/O error at a send's COMMIT is
//!   `AmbiguousOutcome`; an acknowledgement's is settled by running it again; the file system
//!   reporting the file damaged is `Corrupt`.
//! * **Exactly once**: a roll first *claims* events, durably assigning each its per-object
//!   sequence number; the cold commit records per-object watermarks, so re-committing a claimed
//!   batch after an unknown outcome (or, with the durable log, after a crash) never duplicates
//!   or drops an event.
//! * **Backpressure** when the buffer is full ([`Backpressure`]): fail fast, wait with a
//!   deadline, or spill to disk.
//! * **Transforms**: filter, map or re-route events to another sink (table).
//! * **Refused for good**: a batch a sink refuses for good would stop every roll (a claimed
//!   batch is committed first): `Pipeline::take_refused` and `ArrowPipeline::take_refused` take
//!   it out, to the caller, and the rest goes on.
//! * **Cloudflare Pipelines**: `cloudflare::CloudflareStreamClient` sends the same events to a
//!   Cloudflare stream over HTTP (feature `cloudflare`), **at least once**: the stream's HTTP
//!   endpoint has no idempotency key, so a request whose reply was lost and that is sent again
//!   may deliver its events twice (such a failure is `AmbiguousOutcome`).
//! * **User Arrow schemas**: [`arrow::ArrowPipeline`] rolls `RecordBatch`es into numbered,
//!   exactly-once appends to an Iceberg table with that schema ([`arrow::ArrowSink`]; the
//!   Arrow types Iceberg stores exactly, see `dotdo_iceberg::ArrowTable`).
//! * **Metrics**: events in, bytes, rolls, commit latency, buffer depth, end-to-end lag.
//!
//! A pipeline owns the sequence numbers of the objects it writes: give it its own table (or at
//! least objects no runtime writes to the same table).
//!
//! Example: see [`Pipeline`].
#![warn(missing_docs)]

pub mod arrow;
#[cfg(feature = "cloudflare")]
pub mod cloudflare;
mod event;
mod log;
mod pipeline;
mod settings;

pub use event::{Event, Transformed};
pub use pipeline::{Pipeline, PipelineBuilder, PipelineMetrics, RollReport, Transform, MAX_ROLL_BACKOFF};
pub use settings::{Backpressure, Durability, PipelineSettings};
