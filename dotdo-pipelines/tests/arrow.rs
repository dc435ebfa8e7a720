//! Arrow pipelines into an Iceberg table with a user schema: exactly once across lost replies,
//! failed commits and a reopened durable log.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use arrow_array::{Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use dotdo_core::{Error, ErrorKind, Result};
use dotdo_iceberg::{ArrowTable, IcebergColdStore};
use dotdo_pipelines::arrow::{ArrowPipeline, ArrowSink};
use dotdo_pipelines::{Durability, PipelineSettings};

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false), Field::new("name", DataType::Utf8, true)]))
}

fn batch(from: i64, n: i64) -> RecordBatch {
    let ids = Int64Array::from_iter_values(from..from + n);
    let names = StringArray::from_iter_values((from..from + n).map(|i| format!("user-{i}")));
    RecordBatch::try_new(schema(), vec![Arc::new(ids), Arc::new(names)]).expect("batch")
}

async fn table(dir: &std::path::Path) -> ArrowTable {
    let store =
        IcebergColdStore::builder(dir.to_str().expect("utf-8")).table(["app"], "changes").build().await.expect("store");
    store.arrow_table(&["app"], "users", schema()).await.expect("user table")
}

async fn ids(t: &ArrowTable) -> Vec<i64> {
    let mut out = Vec::new();
    for b in t.read_all().await.expect("read") {
        let col = b.column_by_name("id").expect("id column");
        let col = col.as_any().downcast_ref::<Int64Array>().expect("int64");
        out.extend((0..col.len()).map(|i| col.value(i)));
    }
    out.sort_unstable();
    out
}

/// Wraps a table: can fail every append (stalled) or lose the reply of appends that landed.
#[derive(Debug)]
struct Flaky {
    inner: ArrowTable,
    stalled: AtomicBool,
    lose: AtomicU32,
    /// Refuse every append for good (`InvalidInput`), counting them.
    refusing: AtomicBool,
    refused: AtomicU32,
    /// Refuse appends (for good) after this many calls (`u32::MAX`: never).
    refuse_after: AtomicU32,
    appends: AtomicU32,
    /// The next append never answers (a commit still under way when its caller gives up).
    hang_next: AtomicBool,
    /// The next append lands nothing yet and answers `AmbiguousOutcome`; its request is kept
    /// for [`land`](Self::land) (still queued at a remote catalog).
    stash_next: AtomicBool,
    stashed: parking_lot::Mutex<Option<(String, u64, Vec<RecordBatch>)>>,
    /// `last_batch` fails with a retryable `Unavailable` (the table's read refused).
    failing_reads: AtomicBool,
}

impl Flaky {
    fn new(inner: ArrowTable, stalled: bool) -> Arc<Self> {
        Arc::new(Flaky {
            inner,
            stalled: AtomicBool::new(stalled),
            lose: AtomicU32::new(0),
            refusing: AtomicBool::new(false),
            refused: AtomicU32::new(0),
            refuse_after: AtomicU32::new(u32::MAX),
            appends: AtomicU32::new(0),
            hang_next: AtomicBool::new(false),
            stash_next: AtomicBool::new(false),
            stashed: parking_lot::Mutex::new(None),
            failing_reads: AtomicBool::new(false),
        })
    }

    /// The stashed request lands now; its rows.
    async fn land(&self) -> u64 {
        let (stream, id, batches) = self.stashed.lock().take().expect("a stashed request");
        self.inner.append(&stream, id, batches).await.expect("the late request lands").rows
    }
}

#[async_trait]
impl ArrowSink for Flaky {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
    async fn last_batch(&self, stream: &str) -> Result<u64> {
        if self.failing_reads.load(Ordering::SeqCst) {
            return Err(Error::unavailable("table read refused (test)"));
        }
        self.inner.last_batch(stream).await
    }
    async fn append(&self, stream: &str, id: u64, batches: Vec<RecordBatch>) -> Result<u64> {
        let n = self.appends.fetch_add(1, Ordering::SeqCst) + 1;
        if self.hang_next.swap(false, Ordering::SeqCst) {
            return std::future::pending().await;
        }
        if self.stash_next.swap(false, Ordering::SeqCst) {
            *self.stashed.lock() = Some((stream.to_string(), id, batches));
            return Err(Error::new(ErrorKind::AmbiguousOutcome, "no reply yet; the request is still queued (test)"));
        }
        if self.refusing.load(Ordering::SeqCst) || n > self.refuse_after.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(Error::invalid("the sink refuses this batch for good (test)"));
        }
        if self.stalled.load(Ordering::SeqCst) {
            return Err(Error::unavailable("sink stalled"));
        }
        let n = self.inner.append(stream, id, batches).await?.rows;
        if self.lose.load(Ordering::SeqCst) > 0 {
            self.lose.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::new(ErrorKind::AmbiguousOutcome, "reply lost after the commit"));
        }
        Ok(n)
    }
}

/// A `close` whose roll fails for a passing reason leaves what waits to the background loop,
/// which rolls it once the sink takes it, then ends (it stopped at `close`, leaving the rows for
/// a manual `roll`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the loop's ticks
async fn a_failed_close_leaves_what_waits_to_the_roll_loop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let sink = Flaky::new(t.clone(), false);
    let settings = PipelineSettings { roll_interval: std::time::Duration::from_millis(8), ..Default::default() };
    let p = ArrowPipeline::open("closing", sink.clone(), settings).expect("pipeline");
    let runner = p.clone();
    let handle = tokio::spawn(async move { runner.run().await });
    p.send(batch(0, 3)).expect("send");
    sink.stalled.store(true, Ordering::SeqCst);
    p.close().await.expect_err("the sink fails the final roll");
    sink.stalled.store(false, Ordering::SeqCst);
    tokio::time::timeout(std::time::Duration::from_secs(10), handle)
        .await
        .expect("the loop rolled and ended")
        .expect("join");
    assert_eq!(ids(&t).await, vec![0, 1, 2]);
}

/// A `close` that fails at once (the table's read refused) with the host dropping its handles
/// before the loop's next tick: `close` hands the pipeline to the loop then and there, which
/// commits the rows. The loop found no pipeline at its next tick and ended: the rows were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: waiting for the loop to sleep
async fn a_close_that_fails_at_once_then_dropped_handles_leave_what_waits_to_the_roll_loop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let sink = Flaky::new(t.clone(), false);
    let clock = dotdo_core::ManualClock::new(dotdo_core::Timestamp::from_millis(1_700_000_000_000));
    let p =
        ArrowPipeline::open_with_clock("dropped", sink.clone(), PipelineSettings::default(), Arc::new(clock.clone()))
            .expect("pipeline");
    let handle = tokio::spawn(p.run());
    let start = std::time::Instant::now();
    while clock.pending_sleeps() == 0 {
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "the loop never slept");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    p.send(batch(0, 3)).expect("send");
    sink.failing_reads.store(true, Ordering::SeqCst);
    p.close().await.expect_err("the table read fails");
    drop(p);
    sink.failing_reads.store(false, Ordering::SeqCst);
    for _ in 0..10_000 {
        if handle.is_finished() {
            break;
        }
        clock.advance(std::time::Duration::from_millis(50));
        // Real time too: the roll's commit does real I/O between the clock's sleeps.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    tokio::time::timeout(std::time::Duration::from_secs(10), handle).await.expect("the loop ended").expect("join");
    assert_eq!(ids(&t).await, vec![0, 1, 2]);
}

/// A batch of no rows is accepted and dropped: nothing buffered, nothing logged. Each was kept in
/// memory and as a row of the durable log, counted by no capacity and due for no roll, so a
/// producer of empty (filtered) batches grew both without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_batches_are_accepted_and_hold_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let log = dir.path().join("arrow-log.db");
    let settings = PipelineSettings { durability: Durability::Durable(log.clone()), ..Default::default() };
    let p = ArrowPipeline::open("empty", Flaky::new(t.clone(), false), settings).expect("pipeline");
    for _ in 0..100 {
        p.send(batch(0, 0)).expect("an empty batch");
    }
    assert_eq!(p.counters(), (0, 0, 0, 0));
    assert!(!p.roll_due());
    let logged: i64 = rusqlite::Connection::open(&log)
        .expect("log")
        .query_row("SELECT count(*) FROM arrow_log", [], |r| r.get(0))
        .expect("count");
    assert_eq!(logged, 0, "nothing logged");
    p.send(batch(0, 3)).expect("send");
    assert_eq!(p.close().await.expect("close"), 3);
    assert_eq!(p.send(batch(0, 0)).expect_err("closed").kind(), &ErrorKind::Shutdown);
    assert_eq!(ids(&t).await, vec![0, 1, 2]);
}

/// A batch whose struct column has the sink's field types under other names or in another order
/// is refused at `send` (`InvalidInput`, nothing buffered): arrow's type equality ignores struct
/// field names, so `Struct<lon, lat>` was buffered for a `Struct<lat, lon>` table and each value
/// committed into the other's column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn struct_fields_under_other_names_are_refused_at_send() {
    use arrow_array::{Float64Array, StructArray};
    use arrow_schema::Fields;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("store");
    let loc = |a: &str, b: &str| {
        Fields::from(vec![Field::new(a, DataType::Float64, false), Field::new(b, DataType::Float64, false)])
    };
    let schema_of = |f: Fields| Arc::new(Schema::new(vec![Field::new("loc", DataType::Struct(f), false)]));
    let t = store.arrow_table(&["app"], "places", schema_of(loc("lat", "lon"))).await.expect("user table");
    let batch = |f: Fields| {
        let column = StructArray::new(
            f.clone(),
            vec![Arc::new(Float64Array::from(vec![52.5])), Arc::new(Float64Array::from(vec![13.4]))],
            None,
        );
        RecordBatch::try_new(schema_of(f), vec![Arc::new(column)]).expect("batch")
    };
    let p = ArrowPipeline::open("places", Arc::new(t), PipelineSettings::default()).expect("pipeline");
    let e = p.send(batch(loc("lon", "lat"))).expect_err("fields swapped");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    p.send(batch(loc("lat", "lon"))).expect("the sink's shape");
    assert_eq!(p.counters(), (1, 0, 0, 1), "only the batch of the sink's shape waits");
}

/// A batch with a decimal beyond its column's precision is refused at `send` (`InvalidInput`,
/// nothing buffered): the table refuses it for good, so once logged it failed every roll and
/// the batches behind it waited for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decimals_beyond_their_precision_are_refused_at_send() {
    use arrow_array::Decimal128Array;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("store");
    let schema = Arc::new(Schema::new(vec![Field::new("price", DataType::Decimal128(5, 2), false)]));
    let t = store.arrow_table(&["app"], "prices", schema.clone()).await.expect("user table");
    let batch = |v: i128| {
        let column = Decimal128Array::from(vec![v]).with_precision_and_scale(5, 2).expect("type");
        RecordBatch::try_new(schema.clone(), vec![Arc::new(column)]).expect("batch")
    };
    let p = ArrowPipeline::open("prices", Arc::new(t), PipelineSettings::default()).expect("pipeline");
    let e = p.send(batch(4_294_967_297)).expect_err("beyond decimal(5,2)");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("price"), "names the column: {e}");
    p.send(batch(99_999)).expect("within decimal(5,2)");
    assert_eq!(p.close().await.expect("the roll commits"), 1);
    assert_eq!(p.counters(), (1, 1, 1, 0));
}

/// The same for a time of day outside a day (`Time64(Microsecond)` of 24:00:00): iceberg refuses
/// it when it gathers a data file's statistics, so once logged, every roll wrote a file and
/// failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_outside_a_day_are_refused_at_send() {
    use arrow_array::Time64MicrosecondArray;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("store");
    let schema =
        Arc::new(Schema::new(vec![Field::new("opens", DataType::Time64(arrow_schema::TimeUnit::Microsecond), false)]));
    let t = store.arrow_table(&["app"], "hours", schema.clone()).await.expect("user table");
    let batch = |v: i64| {
        RecordBatch::try_new(schema.clone(), vec![Arc::new(Time64MicrosecondArray::from(vec![v]))]).expect("batch")
    };
    let p = ArrowPipeline::open("hours", Arc::new(t), PipelineSettings::default()).expect("pipeline");
    let e = p.send(batch(86_400_000_000)).expect_err("24:00:00");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("opens"), "names the column: {e}");
    p.send(batch(86_399_999_999)).expect("23:59:59.999999");
    assert_eq!(p.close().await.expect("the roll commits"), 1);
    assert_eq!(p.counters(), (1, 1, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_schema_batches_land_once_per_roll_and_replays_write_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let sink = Flaky::new(t.clone(), false);
    let p = ArrowPipeline::open("signups", sink.clone(), PipelineSettings::default()).expect("pipeline");
    p.send(batch(0, 100)).expect("send");
    p.send(batch(100, 50)).expect("send");
    assert_eq!(p.roll().await.expect("roll"), 150);
    assert_eq!(t.last_batch("signups").await.expect("mark"), 1);
    sink.lose.store(2, Ordering::SeqCst);
    p.send(batch(150, 10)).expect("send");
    p.roll().await.expect("lost replies are resolved by re-appending the same id");
    assert_eq!(ids(&t).await, (0..160).collect::<Vec<_>>(), "every row exactly once");
    assert_eq!(t.append("signups", 2, vec![batch(150, 10)]).await.expect("replay").rows, 0);
    let wrong = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)])),
        vec![Arc::new(Int64Array::from(vec![1]))],
    )
    .expect("batch");
    assert_eq!(p.send(wrong).expect_err("schema").kind(), &ErrorKind::InvalidInput);
    assert_eq!(p.counters(), (160, 160, 2, 0));

    let small =
        ArrowPipeline::open("small", sink, PipelineSettings { capacity: 10, ..Default::default() }).expect("pipeline");
    let too_big = small.send(batch(500, 11)).expect_err("larger than the whole buffer");
    assert!(matches!(too_big.kind(), ErrorKind::LimitExceeded { limit: 10, actual: 11, .. }), "{too_big}");
    small.send(batch(500, 10)).expect("fills the buffer");
    assert_eq!(small.send(batch(510, 1)).expect_err("full").kind(), &ErrorKind::Unavailable);

    // By size: the byte capacity holds two of these batches, whatever the row capacity.
    let slice_bytes = |b: &RecordBatch| -> usize {
        b.columns().iter().map(|c| c.to_data().get_slice_memory_size().expect("slice size")).sum()
    };
    let size = slice_bytes(&batch(600, 100));
    let settings = PipelineSettings { capacity_bytes: size * 5 / 2, ..Default::default() };
    let sized = ArrowPipeline::open("sized", Arc::new(t.clone()), settings).expect("pipeline");
    let too_big = sized.send(batch(600, 300)).expect_err("larger than the whole buffer");
    assert!(matches!(too_big.kind(), ErrorKind::LimitExceeded { .. }), "{too_big}");
    sized.send(batch(600, 100)).expect("first");
    sized.send(batch(700, 100)).expect("second");
    let full = sized.send(batch(800, 100)).expect_err("third");
    assert_eq!(full.kind(), &ErrorKind::Unavailable, "{full}");
    assert_eq!(sized.roll().await.expect("roll"), 200);
    sized.send(batch(800, 100)).expect("room after the roll");
    // Slices count their own rows, not the buffers they share with the whole batch.
    assert_eq!(sized.roll().await.expect("roll"), 100);
    let whole = batch(1000, 200);
    for i in 0..4 {
        sized.send(whole.slice(i * 50, 50)).expect("a slice of a batch larger than the room left");
    }
    assert_eq!(sized.roll().await.expect("roll"), 200);
}

/// A durable pipeline of stream "orders" into `t` whose sink is stalled: `first` rows (ids from
/// 0) are claimed by a failed roll, then `then` more rows sent; the process "dies" there, leaving
/// a claimed batch and a pending one in the log at `<dir>/arrow-log.db`. Returns the settings.
async fn die_with_a_claimed_and_a_pending_batch(
    dir: &std::path::Path,
    t: &ArrowTable,
    first: i64,
    then: i64,
) -> PipelineSettings {
    let settings = PipelineSettings { durability: Durability::Durable(dir.join("arrow-log.db")), ..Default::default() };
    let sink = Flaky::new(t.clone(), true);
    let p = ArrowPipeline::open("orders", sink, settings.clone()).expect("pipeline");
    p.send(batch(0, first)).expect("send");
    assert!(p.roll().await.is_err(), "stalled: claimed but not committed");
    p.send(batch(first, then)).expect("send after the claim");
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_log_recommits_a_claimed_batch_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let settings = die_with_a_claimed_and_a_pending_batch(dir.path(), &t, 40, 5).await;
    let p = ArrowPipeline::open("orders", Arc::new(t.clone()), settings).expect("reopen");
    assert_eq!(p.counters().3, 45, "both batches survived");
    assert_eq!(p.close().await.expect("close rolls"), 45);
    assert_eq!(ids(&t).await, (0..45).collect::<Vec<_>>());
    assert_eq!(t.last_batch("orders").await.expect("mark"), 2);
    let other = ArrowPipeline::open("bad name!", Arc::new(t.clone()), PipelineSettings::default());
    assert_eq!(other.expect_err("bad stream name").kind(), &ErrorKind::InvalidInput);
}

/// A durable log belongs to the stream that first opened it: opened for another stream, its
/// claimed batch id would be judged against that stream's marks (committed a second time, or
/// dropped as a replay). Refused (`InvalidInput`), nothing committed; the owner reopens it and
/// commits every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_log_is_refused_to_another_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let settings = die_with_a_claimed_and_a_pending_batch(dir.path(), &t, 10, 5).await;
    let e = ArrowPipeline::open("refunds", Arc::new(t.clone()), settings.clone()).expect_err("another stream's log");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("orders"), "names the owner: {e}");
    assert!(ids(&t).await.is_empty(), "nothing committed");
    let p = ArrowPipeline::open("orders", Arc::new(t.clone()), settings).expect("the owner reopens it");
    assert_eq!(p.close().await.expect("close rolls"), 15);
    assert_eq!(ids(&t).await, (0..15).collect::<Vec<_>>());
}

/// A column added to the table while batches wait in a durable log (and another handle still
/// has the old schema): the logged batches are committed with nulls in the new column instead of
/// being refused forever; new batches carry it; the old handle's appends get nulls too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_logged_before_a_column_was_added_still_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let settings = die_with_a_claimed_and_a_pending_batch(dir.path(), &t, 10, 5).await;
    let evolved = t.add_column("note", DataType::Utf8).await.expect("add column");
    let p = ArrowPipeline::open("orders", Arc::new(evolved.clone()), settings).expect("reopen with the new schema");
    let notes = StringArray::from_iter_values((15..20).map(|i| format!("note-{i}")));
    let ids_col = Int64Array::from_iter_values(15..20);
    let names = StringArray::from_iter_values((15..20).map(|i| format!("user-{i}")));
    let new_batch = RecordBatch::try_new(evolved.schema(), vec![Arc::new(ids_col), Arc::new(names), Arc::new(notes)])
        .expect("batch");
    p.send(new_batch).expect("a batch with the new column");
    assert_eq!(p.close().await.expect("close commits the old and the new batches"), 20);
    assert_eq!(t.append("old-handle", 1, vec![batch(20, 3)]).await.expect("the old handle still appends").rows, 3);
    assert_eq!(ids(&evolved).await, (0..23).collect::<Vec<_>>(), "every row exactly once");
    let mut with_note = 0;
    for b in evolved.read_all().await.expect("read") {
        let note = b.column_by_name("note").expect("note column");
        with_note += note.len() - note.null_count();
    }
    assert_eq!(with_note, 5, "only the new batch has notes; older rows read null");
}

/// A durable log holding rows under two claimed ids (a claim whose reply was lost, then a
/// later claim, then a crash) commits each id's rows under that id, once: reopened twice, every
/// row is in the table exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_with_two_claimed_ids_commits_each_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let path = dir.path().join("arrow-log.db");
    let settings = die_with_a_claimed_and_a_pending_batch(dir.path(), &t, 10, 5).await;
    // The second batch's rows claimed as batch 2 as well (what a lost claim reply led to).
    let c = rusqlite::Connection::open(&path).expect("open log");
    assert_eq!(c.execute("UPDATE arrow_log SET batch = 2 WHERE batch IS NULL", []).expect("claim"), 1);
    drop(c);
    for _ in 0..2 {
        let p = ArrowPipeline::open("orders", Arc::new(t.clone()), settings.clone()).expect("reopen");
        p.close().await.expect("close");
    }
    assert_eq!(ids(&t).await, (0..15).collect::<Vec<_>>(), "every row exactly once");
    assert_eq!(t.last_batch("orders").await.expect("mark"), 2);
}

/// Senders on two threads race `close` (memory and durable log): every batch whose `send` got
/// `Ok` is in the table once close has returned, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_send_acknowledged_while_closing_is_committed() {
    // Rounds in which senders were still being acknowledged as close was called (a send
    // acknowledged after the count read just before it): rounds that race close.
    let mut raced = 0;
    for round in 0..40i64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = table(dir.path()).await;
        let durability =
            if round % 2 == 0 { Durability::Memory } else { Durability::Durable(dir.path().join("log.db")) };
        let p = ArrowPipeline::open("race", Arc::new(t.clone()), PipelineSettings { durability, ..Default::default() })
            .expect("pipeline");
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let senders: Vec<_> = (0..2i64)
            .map(|th| {
                let (p, sent) = (p.clone(), sent.clone());
                std::thread::spawn(move || {
                    let mut acked = Vec::new();
                    for i in 0.. {
                        let id = (th << 40) + i;
                        match p.send(batch(id, 1)) {
                            Ok(()) => {
                                acked.push(id);
                                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            // Full (close is slow to come on a loaded machine): not
                            // acknowledged, try again.
                            Err(e) if e.kind() == &ErrorKind::Unavailable => std::thread::yield_now(),
                            Err(e) => {
                                assert_eq!(e.kind(), &ErrorKind::Shutdown, "{e}");
                                break;
                            }
                        }
                    }
                    acked
                })
            })
            .collect();
        // Let the senders get going (on a loaded machine they may take a while to start: the
        // race needs sends in flight), then close at a moment that varies by round.
        use dotdo_core::Clock;
        let started = dotdo_core::SystemClock::new();
        let t0 = started.monotonic();
        while sent.load(std::sync::atomic::Ordering::SeqCst) < 20 {
            assert!(started.monotonic() - t0 < std::time::Duration::from_secs(30), "round {round}: senders never sent");
            tokio::task::yield_now().await;
        }
        #[allow(clippy::disallowed_methods)]
        tokio::time::sleep(std::time::Duration::from_micros(300 + 100 * round as u64)).await;
        let before_close = sent.load(std::sync::atomic::Ordering::SeqCst);
        p.close().await.expect("close");
        // Each sender stopped on `Shutdown` (its loop ends only there), after sending.
        let mut acked: Vec<i64> = senders.into_iter().flat_map(|h| h.join().expect("sender")).collect();
        raced += u32::from(acked.len() as u64 > before_close);
        acked.sort_unstable();
        let mut landed = ids(&t).await;
        landed.sort_unstable();
        assert_eq!(landed, acked, "round {round}: acknowledged batches committed once");
    }
    println!("sends still acknowledged as close was called in {raced} of 40 rounds");
    assert!(raced > 0, "no send was acknowledged as close was called: the race was never run");
}

/// An Arrow pipeline's durable log serves one pipeline at a time, like the event pipeline's
/// (two would claim and commit the same logged batches); backpressure other than `FailFast` is
/// refused rather than silently ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrow_log_serves_one_pipeline_and_event_only_settings_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let settings =
        PipelineSettings { durability: Durability::Durable(dir.path().join("arrow-log.db")), ..Default::default() };
    let first = ArrowPipeline::open("orders", Arc::new(t.clone()), settings.clone()).expect("first");
    let e = ArrowPipeline::open("orders", Arc::new(t.clone()), settings.clone()).expect_err("second on the same log");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    // An event pipeline keeps its own table in the same file: it may share it.
    let events = dotdo_pipelines::Pipeline::builder(Arc::new(dotdo_core::MemoryColdStore::new()))
        .with_settings(settings.clone())
        .build()
        .expect("an event pipeline on the same file");
    drop(events);
    first.send(batch(0, 3)).expect("send");
    drop(first);
    let again = ArrowPipeline::open("orders", Arc::new(t.clone()), settings).expect("reopened");
    assert_eq!(again.close().await.expect("close"), 3);
    assert_eq!(ids(&t).await, [0, 1, 2]);
    let wait = PipelineSettings {
        backpressure: dotdo_pipelines::Backpressure::Wait(std::time::Duration::from_secs(1)),
        ..Default::default()
    };
    let e = ArrowPipeline::open("w", Arc::new(t.clone()), wait).expect_err("Wait is for event pipelines");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
}

/// An Arrow log whose lock file was deleted is locked again at the pipeline's next call, as the
/// event pipeline's is; a second pipeline that opened the log meanwhile (and committed from it)
/// leaves the first refusing every call (`Conflict`, not retryable) until it is opened again,
/// and every acknowledged batch lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrow_log_whose_lock_file_was_deleted_still_serves_one_pipeline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let lock = dir.path().join("arrow-log.db.arrow.lock");
    let settings =
        PipelineSettings { durability: Durability::Durable(dir.path().join("arrow-log.db")), ..Default::default() };
    let open = || ArrowPipeline::open("orders", Arc::new(t.clone()), settings.clone());
    let first = open().expect("first");
    first.send(batch(0, 3)).expect("send");
    std::fs::remove_file(&lock).expect("the lock file is deleted");
    first.send(batch(3, 3)).expect("locked again");
    assert!(lock.exists(), "the lock file is made again");
    let e = open().expect_err("a second pipeline");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    std::fs::remove_file(&lock).expect("the lock file is deleted");
    let second = open().expect("the second took the lock");
    assert_eq!(second.close().await.expect("close"), 6, "the first's logged batches");
    drop(second);
    let e = first.send(batch(6, 3)).expect_err("the first no longer has the log");
    assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Conflict, false), "{e}");
    drop(first);
    let third = open().expect("opened again");
    third.send(batch(6, 3)).expect("send");
    assert_eq!(third.close().await.expect("close"), 3);
    assert_eq!(ids(&t).await, (0..9).collect::<Vec<i64>>());
}

/// A sink that refuses the claimed batch for good is not asked again every tick: `run` backs
/// off after each failed roll (doubling pauses up to `MAX_ROLL_BACKOFF`), as the event
/// pipeline does. (It retried every tick, with a catalog read and a warning each time.)
#[allow(clippy::disallowed_methods)] // the pipeline runs on real time
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_refusing_for_good_is_not_hammered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let sink = Flaky::new(t.clone(), false);
    sink.refusing.store(true, Ordering::SeqCst);
    let settings = PipelineSettings { roll_interval: std::time::Duration::from_millis(20), ..Default::default() };
    let p = Arc::new(ArrowPipeline::open("refused", sink.clone(), settings).expect("pipeline"));
    p.send(batch(0, 10)).expect("send");
    let runner = tokio::spawn({
        let p = p.clone();
        async move { p.run().await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let calls = sink.refused.load(Ordering::SeqCst);
    assert!((1..10).contains(&calls), "{calls} appends in one second (a tick is 5 ms)");
    sink.refusing.store(false, Ordering::SeqCst);
    p.close().await.expect("close commits once the sink accepts");
    runner.await.expect("run ends at close");
    assert_eq!(ids(&t).await, (0..10).collect::<Vec<_>>());
}

/// A commit whose first attempt's outcome was unknown stays open also when the later attempts
/// fail otherwise (the sink down, or refusing the batch for good): `take_refused` hands nothing
/// out until a roll the sink answers with the batch landed (handed out and sent again under a
/// new id, its rows would land twice beside the late request's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_outcome_followed_by_other_failures_keeps_the_commit_open() {
    for refused_for_good in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = table(dir.path()).await;
        let sink = Flaky::new(t.clone(), false);
        let p = ArrowPipeline::open("unknown", sink.clone(), PipelineSettings::default()).expect("pipeline");
        p.send(batch(0, 3)).expect("send");
        sink.stash_next.store(true, Ordering::SeqCst);
        if refused_for_good {
            sink.refusing.store(true, Ordering::SeqCst);
        } else {
            sink.stalled.store(true, Ordering::SeqCst);
        }
        let e = p.roll().await.expect_err("the sink fails every later attempt");
        let want = if refused_for_good { ErrorKind::InvalidInput } else { ErrorKind::Unavailable };
        assert_eq!(e.kind(), &want, "{e}");
        let e = p.take_refused().await.expect_err("the first attempt may still land");
        assert_eq!(e.kind(), &ErrorKind::Conflict, "refused for good {refused_for_good}: {e}");
        assert!(e.is_retryable(), "{e}");
        assert_eq!(sink.land().await, 3, "the first request lands late");
        sink.refusing.store(false, Ordering::SeqCst);
        sink.stalled.store(false, Ordering::SeqCst);
        p.roll().await.expect("a roll settles it");
        assert!(p.take_refused().await.expect("nothing claimed").is_none());
        assert_eq!(ids(&t).await, [0, 1, 2], "refused for good {refused_for_good}: each row once");
    }
}

/// A roll dropped by its caller while the sink was committing its batch (a timeout around it)
/// leaves that commit's outcome open: `take_refused` refuses to hand the batch out until a roll
/// has settled it (handed out, a re-send under a new id would land beside a late landing of the
/// old commit: its rows twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_commit_a_dropped_roll_left_under_way_is_not_taken_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let sink = Flaky::new(t.clone(), false);
    let p = ArrowPipeline::open("dropped", sink.clone(), PipelineSettings::default()).expect("pipeline");
    p.send(batch(0, 3)).expect("send");
    sink.hang_next.store(true, Ordering::SeqCst);
    let dropped = tokio::time::timeout(std::time::Duration::from_millis(50), p.roll()).await;
    assert!(dropped.is_err(), "the roll was still committing when it was dropped");
    let e = p.take_refused().await.expect_err("the batch's commit may still land");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(e.is_retryable(), "{e}");
    // A roll that fails for now settles nothing: the dropped commit may still land.
    sink.stalled.store(true, Ordering::SeqCst);
    p.roll().await.expect_err("the sink is stalled");
    let e = p.take_refused().await.expect_err("still unsettled");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    sink.stalled.store(false, Ordering::SeqCst);
    assert_eq!(p.roll().await.expect("a roll settles it"), 3);
    assert!(p.take_refused().await.expect("nothing claimed").is_none());
    assert_eq!(ids(&t).await, [0, 1, 2]);
    // A roll that fails for now without being dropped leaves no commit under way: its batch
    // can be taken out.
    p.send(batch(3, 2)).expect("send");
    sink.stalled.store(true, Ordering::SeqCst);
    p.roll().await.expect_err("the sink is stalled");
    let taken = p.take_refused().await.expect("no commit under way").expect("the claimed batch");
    assert_eq!(taken.batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 2);
}

/// A batch an earlier process claimed (its commit may have been under way when it ended: a
/// request a remote catalog still holds) is handed out by `take_refused` only once the sink has
/// answered this process; it was handed out at once, and a late landing of the earlier commit
/// wrote its rows beside the caller's re-send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_an_earlier_process_claimed_is_handed_out_once_the_sink_answered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let settings =
        PipelineSettings { durability: Durability::Durable(dir.path().join("log.db")), ..Default::default() };
    let sink = Flaky::new(t.clone(), false);
    let p = ArrowPipeline::open("inherited", sink.clone(), settings.clone()).expect("pipeline");
    sink.refusing.store(true, Ordering::SeqCst);
    p.send(batch(0, 3)).expect("send");
    p.roll().await.expect_err("refused for good");
    drop(p);
    let p = ArrowPipeline::open("inherited", sink.clone(), settings).expect("reopen");
    let e = p.take_refused().await.expect_err("the sink has not answered this process");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    // A roll that fails for a passing reason settles nothing (it was handed out after one).
    sink.refusing.store(false, Ordering::SeqCst);
    sink.stalled.store(true, Ordering::SeqCst);
    p.roll().await.expect_err("the sink is down");
    let e = p.take_refused().await.expect_err("still not answered");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    sink.stalled.store(false, Ordering::SeqCst);
    sink.refusing.store(true, Ordering::SeqCst);
    p.roll().await.expect_err("refused again");
    let taken = p.take_refused().await.expect("take").expect("the refused batch");
    assert_eq!(taken.batches[0].num_rows(), 3);
}

/// A batch the sink refuses for good stops every roll (it is committed first); `take_refused`
/// takes it out, and the batches behind it go on. A batch that turned out committed is
/// acknowledged instead. With a durable log, the taken-out batch leaves the log, and its id is
/// not claimed again after a reopen (the sink's mark is below it: a reused id would make a
/// late landing of the refused batch pass for the new one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_is_taken_out_and_the_rest_goes_on() {
    use dotdo_pipelines::arrow::RefusedBatch;
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    for durable in [false, true] {
        let stream = if durable { "durable" } else { "memory" };
        let log = dir.path().join(format!("{stream}-log.db"));
        let settings = PipelineSettings {
            durability: if durable { Durability::Durable(log.clone()) } else { Durability::Memory },
            ..Default::default()
        };
        let sink = Flaky::new(t.clone(), false);
        let p = ArrowPipeline::open(stream, sink.clone(), settings.clone()).expect("pipeline");
        assert!(p.take_refused().await.expect("nothing claimed").is_none());
        sink.refusing.store(true, Ordering::SeqCst);
        p.send(batch(0, 3)).expect("send");
        p.roll().await.expect_err("refused for good");
        sink.refusing.store(false, Ordering::SeqCst);
        p.send(batch(3, 2)).expect("send");
        // The refused batch is claimed: it goes first, and is refused again.
        sink.refusing.store(true, Ordering::SeqCst);
        p.roll().await.expect_err("still refused");
        sink.refusing.store(false, Ordering::SeqCst);
        let RefusedBatch { id, batches } = p.take_refused().await.expect("take").expect("the refused batch");
        assert_eq!((id, batches.len(), batches[0].num_rows()), (1, 1, 3));
        assert_eq!(p.roll().await.expect("the rest"), 2);
        assert_eq!(t.last_batch(stream).await.expect("mark"), 2, "under the next id");
        assert_eq!(p.counters(), (5, 2, 1, 0));
        // A claimed batch found committed is acknowledged, not taken out.
        sink.refusing.store(true, Ordering::SeqCst);
        p.send(batch(5, 1)).expect("send");
        p.roll().await.expect_err("refused");
        t.append(stream, 3, vec![batch(5, 1)]).await.expect("an attempt that landed after all");
        sink.refusing.store(false, Ordering::SeqCst);
        assert!(p.take_refused().await.expect("take").is_none(), "committed");
        assert_eq!(p.counters(), (6, 3, 1, 0));
        if durable {
            // Taken out, then a reopen: the log holds nothing, and the next claim takes an id
            // above the one taken out (the sink's mark, 3, is below it).
            sink.refusing.store(true, Ordering::SeqCst);
            p.send(batch(6, 1)).expect("send");
            p.roll().await.expect_err("refused");
            let taken = p.take_refused().await.expect("take").expect("refused");
            assert_eq!(taken.id, 4);
            drop(p);
            sink.refusing.store(false, Ordering::SeqCst);
            let p = ArrowPipeline::open(stream, sink.clone(), settings).expect("reopen");
            assert_eq!(p.counters().3, 0, "nothing waits");
            p.send(batch(7, 1)).expect("send");
            assert_eq!(p.roll().await.expect("roll"), 1);
            assert_eq!(t.last_batch(stream).await.expect("mark"), 5, "id 4 is not claimed again");
        }
    }
    let mut want: Vec<i64> = (3..6).collect();
    want.extend([3, 4, 5, 7]);
    want.sort_unstable();
    assert_eq!(ids(&t).await, want, "the taken-out batches' rows are not in the table");
}

/// After another engine changed the table's schema in a way the pipeline's batches cannot follow
/// (a column dropped), `send` refuses them (`InvalidInput`, not retryable) once a roll found so:
/// it accepted them, the buffer filled, and every send was then a retryable `Unavailable` for
/// ever. The waiting batch is taken out, and a pipeline on the table opened again goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_schema_change_the_old_shape_is_refused_at_send() {
    use iceberg::transaction::{ApplyTransactionAction, Transaction};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["app"], "changes")
        .build()
        .await
        .expect("store");
    let t = store.arrow_table(&["app"], "users", schema()).await.expect("user table");
    let p = ArrowPipeline::open("s", Arc::new(t.clone()), PipelineSettings::default()).expect("pipeline");
    p.send(batch(0, 3)).expect("send");
    p.send(batch(3, 1)).expect("send before any roll found the change");
    let table = store.catalog().load_table(t.ident()).await.expect("load");
    let tx = Transaction::new(&table);
    let tx = tx.update_schema().delete_column("name").apply(tx).expect("apply");
    tx.commit(&*store.catalog()).await.expect("another engine drops a column");
    let e = p.roll().await.expect_err("the old shape");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    let e = p.send(batch(4, 2)).expect_err("no roll can commit it");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(!e.is_retryable(), "{e}");
    assert!(e.to_string().contains("open the table and the pipeline again"), "{e}");
    let taken = p.take_refused().await.expect("take").expect("the claimed batches");
    assert_eq!(taken.batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 4);
    // The change undone (the table's current schema set back): once `take_refused` has looked
    // again, the old shape is taken and committed.
    let location =
        store.catalog().load_table(t.ident()).await.expect("load").metadata_location().expect("location").to_string();
    let path = location.strip_prefix("file://").expect("local");
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
    let before_drop = meta["current-schema-id"].as_i64().expect("id") - 1;
    meta["current-schema-id"] = serde_json::json!(before_drop);
    std::fs::write(path, serde_json::to_vec(&meta).expect("encode")).expect("write");
    assert!(p.send(batch(20, 1)).is_err(), "refused until looked at again");
    assert!(p.take_refused().await.expect("look again").is_none());
    p.send(batch(20, 1)).expect("the old shape, taken again");
    assert_eq!(p.roll().await.expect("committed"), 1);
    // The column dropped again for good, for what follows.
    let table = store.catalog().load_table(t.ident()).await.expect("load");
    let tx = Transaction::new(&table);
    let tx = tx.update_schema().delete_column("name").apply(tx).expect("apply");
    tx.commit(&*store.catalog()).await.expect("another engine drops the column again");
    // Opened again with the table's schema: the pipeline goes on.
    let id_only = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
    let t2 = store.arrow_table(&["app"], "users", id_only.clone()).await.expect("the table as it is now");
    let p2 = ArrowPipeline::open("s", Arc::new(t2.clone()), PipelineSettings::default()).expect("pipeline");
    let b = RecordBatch::try_new(id_only, vec![Arc::new(Int64Array::from(vec![10, 11]))]).expect("batch");
    p2.send(b).expect("the new shape");
    assert_eq!(p2.roll().await.expect("roll"), 2);
    assert_eq!(ids(&t2).await, vec![10, 11, 20]);
}

/// An Arrow pipeline takes the clock its rolls are timed by: the roll interval passes on a
/// `ManualClock` (it used wall time, with no way to give it another clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrow_pipeline_rolls_by_the_clock_it_is_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let clock = dotdo_core::ManualClock::new(dotdo_core::Timestamp::from_millis(1_000_000));
    let settings = PipelineSettings { roll_interval: std::time::Duration::from_secs(3600), ..Default::default() };
    let p = ArrowPipeline::open_with_clock("users", Arc::new(t.clone()), settings, Arc::new(clock.clone()))
        .expect("pipeline");
    p.send(batch(0, 3)).expect("send");
    assert!(!p.roll_due(), "an hour has not passed");
    clock.advance(std::time::Duration::from_secs(3600));
    assert!(p.roll_due(), "an hour passed on the pipeline's clock");
    assert_eq!(p.roll().await.expect("roll"), 3);
    assert_eq!(ids(&t).await, [0, 1, 2]);
    // A buffer half full is due whatever the thresholds (above the capacity here).
    let small =
        PipelineSettings { roll_interval: std::time::Duration::from_secs(3600), capacity: 10, ..Default::default() };
    let p =
        ArrowPipeline::open_with_clock("small", Arc::new(t.clone()), small, Arc::new(clock.clone())).expect("pipeline");
    p.send(batch(10, 4)).expect("send");
    assert!(!p.roll_due(), "4 of 10 rows");
    p.send(batch(14, 1)).expect("send");
    assert!(p.roll_due(), "5 of 10 rows");
}

/// A roll commits at most `roll_rows` rows (whole batches, at least one) per commit, as the
/// event pipeline does: one roll of ten 10-row batches at `roll_rows: 25` is five commits of two
/// batches each, a batch larger than `roll_rows` goes alone, and a durable log claims exactly the
/// batches of each commit (a reopen after a failed roll commits the claimed ones under their id
/// and the rest after them, every row once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roll_commits_at_most_roll_rows_per_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let settings = PipelineSettings { roll_rows: 25, ..Default::default() };
    let p = ArrowPipeline::open("capped", Arc::new(t.clone()), settings).expect("pipeline");
    for i in 0..10 {
        p.send(batch(i * 10, 10)).expect("send");
    }
    p.send(batch(100, 40)).expect("a batch larger than roll_rows");
    assert_eq!(p.roll().await.expect("roll"), 140, "one roll commits everything waiting");
    assert_eq!(t.last_batch("capped").await.expect("mark"), 6, "five commits of 20 rows, then the 40-row batch alone");
    assert_eq!(ids(&t).await, (0..140).collect::<Vec<_>>());
    assert_eq!(p.counters(), (140, 140, 1, 0));

    let log = dir.path().join("capped-log.db");
    let durable =
        PipelineSettings { roll_rows: 25, durability: Durability::Durable(log.clone()), ..Default::default() };
    let sink = Flaky::new(t.clone(), true);
    let p = ArrowPipeline::open("capped-durable", sink.clone(), durable.clone()).expect("pipeline");
    for i in 0..5 {
        p.send(batch(1000 + i * 10, 10)).expect("send");
    }
    assert!(p.roll().await.is_err(), "stalled: the first two batches claimed, not committed");
    let claimed: Vec<(i64, Option<i64>)> = rusqlite::Connection::open(&log)
        .expect("open log")
        .prepare("SELECT id, batch FROM arrow_log ORDER BY id")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .expect("rows");
    assert_eq!(
        claimed.iter().map(|(_, b)| *b).collect::<Vec<_>>(),
        [Some(1), Some(1), None, None, None],
        "exactly the first commit's batches are claimed"
    );
    drop(p);
    let p = ArrowPipeline::open("capped-durable", Arc::new(t.clone()), durable).expect("reopen");
    assert_eq!(p.close().await.expect("close rolls"), 50);
    assert_eq!(t.last_batch("capped-durable").await.expect("mark"), 3, "batch 1 (claimed), then 2 and 3");
    assert_eq!(ids(&t).await, (0..140).chain(1000..1050).collect::<Vec<_>>(), "every row exactly once");
}

/// A claim takes the log's first unclaimed rows as the first pending batches: an unclaimed row
/// that is not one batch (a send logs one) is `Corrupt` at open, naming the row, not claimed
/// out of step with what is pending. So is a claimed one: one of no batch (its bytes cut after
/// the schema) was committed as nothing and its log rows deleted, the batch lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_row_of_other_than_one_batch_is_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let log = dir.path().join("log.db");
    let settings = PipelineSettings { durability: Durability::Durable(log.clone()), ..Default::default() };
    let p = ArrowPipeline::open("odd", Arc::new(t.clone()), settings.clone()).expect("pipeline");
    p.send(batch(0, 3)).expect("send");
    drop(p);
    for (n, claimed) in [(0, None), (2, None), (0, Some(1)), (2, Some(1))] {
        let mut ipc = Vec::new();
        let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut ipc, &schema()).expect("writer");
        for i in 0..n {
            w.write(&batch(10 * i, 2)).expect("write");
        }
        w.finish().expect("finish");
        drop(w);
        let c = rusqlite::Connection::open(&log).expect("open log");
        c.execute("DELETE FROM arrow_log WHERE id > 1", []).expect("clear");
        c.execute("INSERT INTO arrow_log (id, ipc, batch) VALUES (7, ?1, ?2)", rusqlite::params![&ipc, claimed])
            .expect("insert");
        drop(c);
        let e = ArrowPipeline::open("odd", Arc::new(t.clone()), settings.clone()).expect_err("odd row");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{n} batches, claimed {claimed:?}: {e}");
        assert!(e.to_string().contains("row 7"), "{e}");
    }
    // A row claimed under batch id 0, which no claim takes: read as committed (every mark is at
    // least 0), its rows were dropped or refused at every roll.
    let c = rusqlite::Connection::open(&log).expect("open log");
    c.execute("DELETE FROM arrow_log WHERE id > 1", []).expect("clear");
    c.execute("UPDATE arrow_log SET batch = 0 WHERE id = 1", []).expect("damage");
    drop(c);
    let e = ArrowPipeline::open("odd", Arc::new(t.clone()), settings.clone()).expect_err("batch id 0");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("row 1"), "{e}");
    assert!(ids(&t).await.is_empty(), "nothing committed");
}

/// A log row of one batch of no rows (earlier versions logged them) opens and rolls with the
/// rows beside it: only a row of no batch, or of several, is damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_row_of_an_empty_batch_still_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let log = dir.path().join("log.db");
    let settings = PipelineSettings { durability: Durability::Durable(log.clone()), ..Default::default() };
    let p = ArrowPipeline::open("empty", Arc::new(t.clone()), settings.clone()).expect("pipeline");
    p.send(batch(0, 3)).expect("send");
    drop(p);
    let mut ipc = Vec::new();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut ipc, &schema()).expect("writer");
    w.write(&batch(0, 0)).expect("an empty batch");
    w.finish().expect("finish");
    drop(w);
    let c = rusqlite::Connection::open(&log).expect("open log");
    c.execute("INSERT INTO arrow_log (id, ipc) VALUES (7, ?1)", [&ipc]).expect("insert");
    drop(c);
    let p = ArrowPipeline::open("empty", Arc::new(t.clone()), settings).expect("an empty batch is no damage");
    p.close().await.expect("close rolls");
    assert_eq!(ids(&t).await, vec![0, 1, 2], "the other row's batch committed");
}

/// A damaged log row (any byte of its Arrow IPC stream overwritten) is `Corrupt` at open naming
/// the row, or decodes; never a panic or an abort: arrow's IPC reader trusts a message's body
/// length (a negative one panicked, a huge one aborted the process allocating it) and its
/// buffer offsets (past the body: a panic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_log_rows_are_corrupt_not_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let log = dir.path().join("damaged-log.db");
    let settings = PipelineSettings { durability: Durability::Durable(log.clone()), ..Default::default() };
    let p = ArrowPipeline::open("damaged", Arc::new(t.clone()), settings.clone()).expect("pipeline");
    p.send(batch(0, 3)).expect("send");
    drop(p);
    let c = rusqlite::Connection::open(&log).expect("open log");
    let good: Vec<u8> = c.query_row("SELECT ipc FROM arrow_log", [], |r| r.get(0)).expect("the row");
    let (mut corrupt, mut decoded) = (0, 0);
    for at in 0..good.len() {
        for value in [0x00u8, 0x7f, 0x80, 0xff] {
            if good[at] == value {
                continue;
            }
            let mut bad = good.clone();
            bad[at] = value;
            c.execute("UPDATE arrow_log SET ipc = ?1", [&bad]).expect("damage");
            match ArrowPipeline::open("damaged", Arc::new(t.clone()), settings.clone()) {
                Ok(_) => decoded += 1,
                Err(e) => {
                    assert_eq!(e.kind(), &ErrorKind::Corrupt, "byte {at} = {value:#x}: {e}");
                    assert!(e.to_string().contains("arrow_log row 1"), "{e}");
                    corrupt += 1;
                }
            }
        }
    }
    assert!(corrupt > 100, "{corrupt} damaged rows refused, {decoded} decoded");
    println!("{} bytes damaged: {corrupt} Corrupt, {decoded} decoded", good.len());
    c.execute("UPDATE arrow_log SET ipc = ?1", [&good]).expect("mend");
    let p = ArrowPipeline::open("damaged", Arc::new(t.clone()), settings).expect("the mended log");
    assert_eq!(p.close().await.expect("close"), 3);
}

/// A log row that is not a pending batch (a send whose outcome was unknown, whose row landed)
/// makes the next roll `Corrupt`, nothing claimed or committed, instead of claiming rows out of
/// step with the batches committed (which left a batch unclaimed, delivered again on reopen);
/// a reopen reads the log afresh and delivers every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_row_that_is_not_pending_stops_the_roll_until_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let log = dir.path().join("ghost-log.db");
    let settings = PipelineSettings { durability: Durability::Durable(log.clone()), ..Default::default() };
    let p = ArrowPipeline::open("ghost", Arc::new(t.clone()), settings.clone()).expect("pipeline");
    p.send(batch(0, 5)).expect("send");
    // The row of a send that reported failure but landed.
    let mut ipc = Vec::new();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut ipc, &schema()).expect("writer");
    w.write(&batch(5, 5)).expect("write");
    w.finish().expect("finish");
    drop(w);
    rusqlite::Connection::open(&log)
        .expect("open log")
        .execute("INSERT INTO arrow_log (ipc) VALUES (?1)", [&ipc])
        .expect("insert");
    p.send(batch(10, 5)).expect("send");
    let e = p.roll().await.expect_err("out of step");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(ids(&t).await.is_empty(), "nothing committed");
    drop(p);
    let p = ArrowPipeline::open("ghost", Arc::new(t.clone()), settings).expect("reopen");
    assert_eq!(p.close().await.expect("close rolls"), 15);
    assert_eq!(ids(&t).await, (0..15).collect::<Vec<_>>(), "every row once");
}

/// A batch an earlier pipeline committed before it stopped (its reply lost, its log entry kept)
/// is committed again after a reopen and skipped by the sink: neither the roll nor the counters
/// count its rows a second time (they counted the whole claimed batch again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_committed_before_a_restart_is_not_counted_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let settings =
        PipelineSettings { durability: Durability::Durable(dir.path().join("arrow-log.db")), ..Default::default() };
    let sink = Flaky::new(t.clone(), false);
    sink.lose.store(u32::MAX, Ordering::SeqCst);
    {
        let p = ArrowPipeline::open("orders", sink.clone(), settings.clone()).expect("pipeline");
        p.send(batch(0, 40)).expect("send");
        p.roll().await.expect_err("every reply is lost");
    }
    assert_eq!(ids(&t).await, (0..40).collect::<Vec<_>>(), "the batch landed");
    let p = ArrowPipeline::open("orders", Arc::new(t.clone()), settings).expect("reopen");
    p.send(batch(40, 5)).expect("send");
    assert_eq!(p.roll().await.expect("roll"), 5, "only the rows this pipeline committed");
    assert_eq!(p.counters(), (5, 5, 1, 0));
    assert_eq!(ids(&t).await, (0..45).collect::<Vec<_>>());
}

/// A sink that takes the write lock of the pipeline's log (another writer) once an append has
/// landed, so that deleting the committed batch from the log fails.
#[derive(Debug)]
struct LocksLogAfterAppend {
    inner: ArrowTable,
    log: std::path::PathBuf,
    held: std::sync::Mutex<Option<rusqlite::Connection>>,
    armed: AtomicBool,
}

#[async_trait]
impl ArrowSink for LocksLogAfterAppend {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
    async fn last_batch(&self, stream: &str) -> Result<u64> {
        self.inner.last_batch(stream).await
    }
    async fn append(&self, stream: &str, id: u64, batches: Vec<RecordBatch>) -> Result<u64> {
        let n = self.inner.append(stream, id, batches).await?.rows;
        if self.armed.swap(false, Ordering::SeqCst) {
            let c = rusqlite::Connection::open(&self.log).expect("open the log");
            c.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
            *self.held.lock().expect("lock") = Some(c);
        }
        Ok(n)
    }
}

/// A durable pipeline of stream "orders" into `t` (log `<dir>/arrow-log.db`) whose sink takes
/// the log's write lock once its first append has landed.
fn pipeline_whose_log_is_locked_after_an_append(
    dir: &std::path::Path,
    t: &ArrowTable,
) -> (Arc<LocksLogAfterAppend>, ArrowPipeline) {
    let log = dir.join("arrow-log.db");
    let settings = PipelineSettings { durability: Durability::Durable(log.clone()), ..Default::default() };
    let sink = Arc::new(LocksLogAfterAppend {
        inner: t.clone(),
        log,
        held: std::sync::Mutex::new(None),
        armed: AtomicBool::new(true),
    });
    let p = ArrowPipeline::open("orders", sink.clone(), settings).expect("pipeline");
    (sink, p)
}

/// A roll whose commit landed but whose deletion of the batch from the durable log failed (the
/// log locked by another writer past the busy timeout) commits the batch again on the next
/// roll, which the sink skips: its rows count once (they counted twice, and `rows committed`
/// passed `rows accepted`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_log_entry_outlived_its_commit_counts_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let (sink, p) = pipeline_whose_log_is_locked_after_an_append(dir.path(), &t);
    p.send(batch(0, 30)).expect("send");
    p.roll().await.expect_err("the log is locked after the commit");
    assert_eq!(p.counters().1, 30, "the rows landed");
    drop(sink.held.lock().expect("lock").take());
    assert_eq!(p.roll().await.expect("the batch again, skipped by the sink"), 0);
    assert_eq!(p.counters(), (30, 30, 1, 0));
    assert_eq!(ids(&t).await, (0..30).collect::<Vec<_>>());
}

/// The rolls counter counts a roll that committed rows and then failed on a later batch (it
/// counted only rolls that ended well).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roll_that_fails_part_way_counts_as_a_roll() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let sink = Flaky::new(t.clone(), false);
    sink.refuse_after.store(1, Ordering::SeqCst);
    let settings = PipelineSettings { roll_rows: 10, ..Default::default() };
    let p = ArrowPipeline::open("orders", sink.clone(), settings).expect("pipeline");
    p.send(batch(0, 10)).expect("send");
    p.send(batch(10, 10)).expect("send");
    p.roll().await.expect_err("the second batch is refused");
    assert_eq!(p.counters(), (20, 10, 1, 10), "the first batch committed, in one roll");
    sink.refuse_after.store(u32::MAX, Ordering::SeqCst);
    assert_eq!(p.roll().await.expect("the rest"), 10);
    assert_eq!(p.counters(), (20, 20, 2, 0));
    assert_eq!(ids(&t).await, (0..20).collect::<Vec<_>>());
}

/// Another connection holding the durable log's write lock for a moment (a backup, a tool) is
/// waited out: the roll's deletion of its committed batch succeeds once the lock is gone (the
/// log's busy timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_locked_for_a_moment_is_waited_out() {
    use dotdo_core::Clock;
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let (sink, p) = pipeline_whose_log_is_locked_after_an_append(dir.path(), &t);
    p.send(batch(0, 30)).expect("send");
    let releaser = {
        let sink = sink.clone();
        tokio::spawn(async move {
            let clock = dotdo_core::SystemClock::new();
            while sink.held.lock().expect("lock").is_none() {
                clock.sleep(std::time::Duration::from_millis(5)).await;
            }
            clock.sleep(std::time::Duration::from_millis(200)).await;
            drop(sink.held.lock().expect("lock").take());
        })
    };
    assert_eq!(p.roll().await.expect("the lock is waited out"), 30);
    releaser.await.expect("released");
    assert_eq!(p.counters(), (30, 30, 1, 0));
}

/// A batch an earlier pipeline claimed and never committed, committed after a reopen by an
/// attempt whose reply is lost (the retry finds it there and writes nothing), counts as this
/// pipeline's rows (it counted what the retry wrote: none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_claim_committed_now_with_its_reply_lost_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let settings = die_with_a_claimed_and_a_pending_batch(dir.path(), &t, 40, 5).await;
    let sink = Flaky::new(t.clone(), false);
    sink.lose.store(1, Ordering::SeqCst);
    let p = ArrowPipeline::open("orders", sink, settings).expect("reopen");
    assert_eq!(p.close().await.expect("close rolls"), 45, "both batches, committed by this pipeline");
    assert_eq!(p.counters().1, 45);
    assert_eq!(ids(&t).await, (0..45).collect::<Vec<_>>());
}

/// An event pipeline and an Arrow pipeline sharing one durable log file (allowed: each keeps its
/// own table) both roll while the other keeps sending: a claim reads the log before it writes,
/// and as a deferred transaction it failed with `SQLITE_BUSY` whenever the other pipeline
/// committed a send in between (the busy timeout does not apply to that upgrade), so rolls kept
/// failing on a busy shared file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_sharing_a_log_file_roll_while_the_other_sends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = table(dir.path()).await;
    let settings =
        PipelineSettings { durability: Durability::Durable(dir.path().join("shared-log.db")), ..Default::default() };
    let arrow = ArrowPipeline::open("orders", Arc::new(t.clone()), settings.clone()).expect("arrow pipeline");
    let cold = Arc::new(dotdo_core::MemoryColdStore::new());
    let events =
        dotdo_pipelines::Pipeline::builder(cold.clone()).with_settings(settings).build().expect("event pipeline");
    let stop = Arc::new(AtomicBool::new(false));
    // Each side sends from a thread of its own while this task rolls the other side.
    let sender = {
        let (events, stop) = (events.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut sent = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let o = dotdo_core::ObjectId::new(format!("o{}", sent % 7)).expect("id");
                let e = dotdo_pipelines::Event::new(o, "T", format!("k{sent}"), "v", dotdo_core::Timestamp::EPOCH);
                events.send([e]).expect("event send");
                sent += 1;
                // Not a tight loop: the other pipeline's lock waits poll (no fairness).
                std::thread::yield_now();
            }
            sent
        })
    };
    let mut rolled = 0;
    for round in 0..30 {
        arrow.send(batch(round * 10, 10)).expect("arrow send");
        rolled += arrow.roll().await.expect("an Arrow roll while events are sent");
    }
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().expect("sender");
    assert_eq!(rolled, 300);
    let arrow_sender = {
        let (arrow, stop) = (arrow.clone(), Arc::new(AtomicBool::new(false)));
        let flag = stop.clone();
        (
            std::thread::spawn(move || {
                let mut n = 0;
                while !flag.load(Ordering::SeqCst) {
                    arrow.send(batch(1_000 + n * 5, 5)).expect("arrow send");
                    n += 1;
                    std::thread::yield_now();
                }
                n
            }),
            stop,
        )
    };
    let mut delivered = 0;
    for _ in 0..30 {
        delivered += events.roll().await.expect("an event roll while Arrow batches are sent").events;
    }
    arrow_sender.1.store(true, Ordering::SeqCst);
    let arrow_batches = arrow_sender.0.join().expect("arrow sender");
    delivered += events.close().await.expect("close").events;
    assert_eq!(delivered, sent, "every event delivered once");
    let rows = arrow.close().await.expect("close arrow");
    assert_eq!(rows, u64::try_from(arrow_batches * 5).expect("positive"), "the Arrow batches sent meanwhile");
}

/// A durable Arrow log whose recorded next batch id is past what a batch id can be (one above
/// `i64::MAX`, the floor once the last id was taken out; damaged, or edited by hand) is refused
/// at open as `Corrupt` naming the row: it opened, and every roll failed for good (`Backend`
/// binding the id, or `InvalidInput` from the table's stream marks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrow_log_whose_next_batch_id_is_out_of_range_is_corrupt() {
    for bad in [(i64::MAX as u64 + 2).to_string(), u64::MAX.to_string(), "0".to_string(), "x".to_string()] {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = table(dir.path()).await;
        let path = dir.path().join("arrow-log.db");
        let settings = PipelineSettings { durability: Durability::Durable(path.clone()), ..Default::default() };
        drop(ArrowPipeline::open("orders", Arc::new(t.clone()), settings.clone()).expect("open"));
        rusqlite::Connection::open(&path)
            .expect("open log")
            .execute("INSERT OR REPLACE INTO arrow_log_meta (k, v) VALUES ('next_id', ?1)", [&bad])
            .expect("damage");
        let e = ArrowPipeline::open("orders", Arc::new(t), settings).expect_err("a damaged floor");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{bad}: {e}");
        assert!(e.to_string().contains("next_id"), "{bad}: {e}");
    }
}

/// A sink whose stream has committed batch `last` and refuses every append for good.
#[derive(Debug)]
struct AtBatch {
    last: u64,
}

#[async_trait]
impl ArrowSink for AtBatch {
    fn schema(&self) -> SchemaRef {
        schema()
    }
    async fn last_batch(&self, _stream: &str) -> Result<u64> {
        Ok(self.last)
    }
    async fn append(&self, _stream: &str, _id: u64, _batches: Vec<RecordBatch>) -> Result<u64> {
        Err(Error::invalid("the sink refuses this batch for good (test)"))
    }
}

/// Batch ids end at `i64::MAX`: a stream that used them all makes a roll `LimitExceeded` (it
/// was a backend error binding the id), and a durable log whose last id was taken out opens
/// again (its floor one above the last id read as damage: `Corrupt`).
#[tokio::test]
async fn a_stream_out_of_batch_ids_is_limit_exceeded_and_its_log_reopens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings =
        PipelineSettings { durability: Durability::Durable(dir.path().join("arrow-log.db")), ..Default::default() };
    let max = i64::MAX as u64;
    let p = ArrowPipeline::open("s", Arc::new(AtBatch { last: max - 1 }), settings.clone()).expect("pipeline");
    p.send(batch(0, 2)).expect("send");
    let e = p.roll().await.expect_err("refused");
    assert!(matches!(e.kind(), ErrorKind::InvalidInput), "{e}");
    let out = p.take_refused().await.expect("take out").expect("the refused batch");
    assert_eq!(out.id, max, "the last batch id");
    p.send(batch(2, 2)).expect("send");
    drop(p);
    let p = ArrowPipeline::open("s", Arc::new(AtBatch { last: max - 1 }), settings).expect("the log reopens");
    let e = p.roll().await.expect_err("no batch id left");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    assert!(e.to_string().contains("every batch id"), "{e}");
    for mode in [Durability::Memory, Durability::Durable(dir.path().join("other.db"))] {
        let settings = PipelineSettings { durability: mode, ..Default::default() };
        let p = ArrowPipeline::open("s", Arc::new(AtBatch { last: max }), settings).expect("pipeline");
        p.send(batch(0, 1)).expect("send");
        let e = p.roll().await.expect_err("no batch id left");
        assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    }
}

/// A sink of one `Utf8View` column that takes every batch (a stream mark per batch id).
#[derive(Debug, Default)]
struct Views {
    last: parking_lot::Mutex<u64>,
    rows: AtomicU32,
    /// The view column inside a struct column (`s: {v}`).
    nested: bool,
    /// The view column as the items of a list column (`l: [v]`).
    list: bool,
}

fn view_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("v", DataType::Utf8View, false)]))
}

fn list_view_schema() -> SchemaRef {
    let item = Arc::new(Field::new("item", DataType::Utf8View, false));
    Arc::new(Schema::new(vec![Field::new("l", DataType::List(item), false)]))
}

fn nested_view_schema() -> SchemaRef {
    let fields = arrow_schema::Fields::from(vec![Field::new("v", DataType::Utf8View, false)]);
    Arc::new(Schema::new(vec![Field::new("s", DataType::Struct(fields), false)]))
}

#[async_trait]
impl ArrowSink for Views {
    fn schema(&self) -> SchemaRef {
        if self.nested {
            nested_view_schema()
        } else if self.list {
            list_view_schema()
        } else {
            view_schema()
        }
    }
    async fn last_batch(&self, _stream: &str) -> Result<u64> {
        Ok(*self.last.lock())
    }
    async fn append(&self, _stream: &str, id: u64, batches: Vec<RecordBatch>) -> Result<u64> {
        let mut last = self.last.lock();
        if id <= *last {
            return Ok(0);
        }
        *last = id;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        self.rows.fetch_add(u32::try_from(rows).expect("few rows"), Ordering::SeqCst);
        Ok(rows as u64)
    }
}

/// One-row slices of a large batch with a `Utf8View` column are logged as their rows: arrow's IPC
/// writer wrote the column's whole data buffers for each slice (20 sends of one row of an 8 MiB
/// batch logged some 160 MiB, which a reopen read back whole); they are delivered after a reopen.
#[tokio::test]
async fn one_row_slices_of_a_view_batch_are_logged_as_their_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("arrow-log.db");
    let settings = PipelineSettings { durability: Durability::Durable(log.clone()), ..Default::default() };
    let values: Vec<String> = (0..8192).map(|i| format!("{i:04}{}", "x".repeat(1020))).collect();
    let column = arrow_array::StringViewArray::from_iter_values(values.iter());
    let big = RecordBatch::try_new(view_schema(), vec![Arc::new(column)]).expect("batch");
    let p = ArrowPipeline::open("s", Arc::new(Views::default()), settings.clone()).expect("pipeline");
    sends_of_one_row_slices_are_logged_small(dir.path(), p, &big, settings, (false, false)).await;
}

/// The same inside a struct column (`s: {v: Utf8View}`): a struct's slice slices its view
/// column, whose data buffers arrow's IPC writer wrote whole (compacted at the top level only).
#[tokio::test]
async fn one_row_slices_of_a_nested_view_batch_are_logged_as_their_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("arrow-log.db");
    let settings = PipelineSettings { durability: Durability::Durable(log.clone()), ..Default::default() };
    let values: Vec<String> = (0..8192).map(|i| format!("{i:04}{}", "x".repeat(1020))).collect();
    let column: arrow_array::ArrayRef = Arc::new(arrow_array::StringViewArray::from_iter_values(values.iter()));
    let fields = arrow_schema::Fields::from(vec![Field::new("v", DataType::Utf8View, false)]);
    let s = arrow_array::StructArray::new(fields, vec![column], None);
    let big = RecordBatch::try_new(nested_view_schema(), vec![Arc::new(s)]).expect("batch");
    let sink = Arc::new(Views { nested: true, ..Default::default() });
    let p = ArrowPipeline::open("s", sink, settings.clone()).expect("pipeline");
    sends_of_one_row_slices_are_logged_small(dir.path(), p, &big, settings, (true, false)).await;
}

/// The same as the items of a list column (`l: [Utf8View]`): a list's slice keeps its whole
/// child, whose views arrow's IPC writer wrote with their whole data buffers.
#[tokio::test]
async fn one_row_slices_of_a_list_of_views_are_logged_as_their_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("arrow-log.db");
    let settings = PipelineSettings { durability: Durability::Durable(log.clone()), ..Default::default() };
    let values: Vec<String> = (0..8192).map(|i| format!("{i:04}{}", "x".repeat(1020))).collect();
    let items: arrow_array::ArrayRef = Arc::new(arrow_array::StringViewArray::from_iter_values(values.iter()));
    let item = Arc::new(Field::new("item", DataType::Utf8View, false));
    let offsets = arrow_buffer::OffsetBuffer::from_lengths(std::iter::repeat_n(1, 8192));
    let l = arrow_array::ListArray::new(item, offsets, items, None);
    let big = RecordBatch::try_new(list_view_schema(), vec![Arc::new(l)]).expect("batch");
    let sink = Arc::new(Views { list: true, ..Default::default() });
    let p = ArrowPipeline::open("s", sink, settings.clone()).expect("pipeline");
    sends_of_one_row_slices_are_logged_small(dir.path(), p, &big, settings, (false, true)).await;
}

/// Send 20 one-row slices of `big` through `p` (a durable pipeline logging in `dir`): the log
/// holds under 8 MiB, and a reopened pipeline delivers each row once.
async fn sends_of_one_row_slices_are_logged_small(
    dir: &std::path::Path,
    p: ArrowPipeline,
    big: &RecordBatch,
    settings: PipelineSettings,
    (nested, list): (bool, bool),
) {
    for i in 0..20 {
        p.send(big.slice(i * 100, 1)).expect("send");
    }
    drop(p);
    let on_disk: u64 = ["arrow-log.db", "arrow-log.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
    assert!(on_disk < 8 << 20, "the log holds {on_disk} bytes for 20 rows of 1 KiB");
    let sink = Arc::new(Views { nested, list, ..Default::default() });
    let p = ArrowPipeline::open("s", sink.clone(), settings).expect("reopen");
    p.roll().await.expect("roll");
    assert_eq!(sink.rows.load(Ordering::SeqCst), 20, "every row delivered once");
}

/// An Arrow pipeline's durable log file deleted or replaced while open: sends and rolls are
/// `Corrupt` naming the file (they were acknowledged into the unlinked file, and lost at exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_log_deleted_or_replaced_while_open_is_corrupt() {
    for replace in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = table(dir.path()).await;
        let path = dir.path().join("arrow-log.db");
        let settings = PipelineSettings { durability: Durability::Durable(path.clone()), ..Default::default() };
        let p = ArrowPipeline::open("orders", Arc::new(t.clone()), settings).expect("pipeline");
        p.send(batch(0, 3)).expect("send");
        if replace {
            let other = dir.path().join("other.db");
            std::fs::copy(&path, &other).expect("copy");
            std::fs::rename(&other, &path).expect("replace");
        } else {
            std::fs::remove_file(&path).expect("delete");
        }
        let e = p.send(batch(3, 3)).expect_err("the file is gone");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "replace {replace}: {e}");
        assert!(e.to_string().contains("arrow-log.db"), "names the file: {e}");
        let e = p.roll().await.expect_err("the file is gone");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "replace {replace}: {e}");
        assert!(ids(&t).await.is_empty(), "nothing committed from a log that is gone");
    }
}
