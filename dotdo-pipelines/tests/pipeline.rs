//! Pipelines on the reference cold store: rolls, exactly-once replays, transforms and every
//! backpressure policy with a full buffer and a stalled sink.

#![allow(clippy::disallowed_methods)] // tests pace spawned tasks with real sleeps

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dotdo_core::*;
use dotdo_pipelines::*;

/// A sink that can stall (fail with a retryable `Unavailable`) or lose the reply of a commit
/// that succeeded (`AmbiguousOutcome`).
#[derive(Debug)]
struct Flaky {
    inner: MemoryColdStore,
    stalled: AtomicBool,
    lose_replies: AtomicU32,
    /// Calls of `watermark` and of `watermarks`.
    watermark_calls: AtomicU32,
    watermarks_calls: AtomicU32,
    /// Refuse every append for good (`InvalidInput`), counting them in `appends`.
    refusing: AtomicBool,
    appends: AtomicU32,
    /// Refuse appends after this many (`u32::MAX`: never).
    refuse_after: AtomicU32,
    /// Appends that land, then never answer (the caller gives up on them).
    hang_after_commit: AtomicU32,
    /// The next append never answers and lands nothing (yet).
    hang_next: AtomicBool,
    /// The next append lands nothing yet and answers `AmbiguousOutcome`; its batch is kept for
    /// [`land`](Self::land) (a request still queued at a remote sink).
    stash_next: AtomicBool,
    stashed: parking_lot::Mutex<Option<ColdBatch>>,
    /// `watermarks` fails with a retryable `Unavailable` (the sink's read refused).
    failing_watermarks: AtomicBool,
}

impl Flaky {
    fn new() -> Arc<Self> {
        Arc::new(Flaky {
            inner: MemoryColdStore::new(),
            stalled: AtomicBool::new(false),
            lose_replies: AtomicU32::new(0),
            watermark_calls: AtomicU32::new(0),
            watermarks_calls: AtomicU32::new(0),
            refusing: AtomicBool::new(false),
            appends: AtomicU32::new(0),
            refuse_after: AtomicU32::new(u32::MAX),
            hang_after_commit: AtomicU32::new(0),
            hang_next: AtomicBool::new(false),
            stash_next: AtomicBool::new(false),
            stashed: parking_lot::Mutex::new(None),
            failing_watermarks: AtomicBool::new(false),
        })
    }

    /// The stashed request lands now.
    async fn land(&self) -> ColdCommit {
        let batch = self.stashed.lock().take().expect("a stashed request");
        self.inner.append(batch).await.expect("the late request lands")
    }
}

#[async_trait]
impl ColdSink for Flaky {
    async fn append(&self, batch: ColdBatch) -> Result<ColdCommit> {
        let n = self.appends.fetch_add(1, Ordering::SeqCst) + 1;
        if self.hang_next.swap(false, Ordering::SeqCst) {
            return futures::future::pending().await;
        }
        if self.stash_next.swap(false, Ordering::SeqCst) {
            *self.stashed.lock() = Some(batch);
            return Err(Error::new(ErrorKind::AmbiguousOutcome, "no reply yet; the request is still queued (test)"));
        }
        if self.refusing.load(Ordering::SeqCst) || n > self.refuse_after.load(Ordering::SeqCst) {
            return Err(Error::invalid("the sink refuses this batch for good (test)"));
        }
        if self.stalled.load(Ordering::SeqCst) {
            return Err(Error::unavailable("sink stalled"));
        }
        let c = self.inner.append(batch).await?;
        if self.hang_after_commit.load(Ordering::SeqCst) > 0 {
            self.hang_after_commit.fetch_sub(1, Ordering::SeqCst);
            futures::future::pending::<()>().await;
        }
        if self.lose_replies.load(Ordering::SeqCst) > 0 {
            self.lose_replies.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::new(ErrorKind::AmbiguousOutcome, "reply lost after the commit"));
        }
        Ok(c)
    }
    async fn watermark(&self, object: &ObjectId) -> Result<Watermark> {
        self.watermark_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.watermark(object).await
    }
    async fn watermarks(&self, objects: &[ObjectId]) -> Result<Vec<Watermark>> {
        self.watermarks_calls.fetch_add(1, Ordering::SeqCst);
        if self.failing_watermarks.load(Ordering::SeqCst) {
            return Err(Error::unavailable("watermark read refused (test)"));
        }
        self.inner.watermarks(objects).await
    }
    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.inner.snapshots().await
    }
    async fn load_state(&self, object: &ObjectId, as_of: AsOf) -> Result<ColdState> {
        self.inner.load_state(object, as_of).await
    }
    async fn read_changes(&self, object: &ObjectId, after: Seq, as_of: AsOf) -> Result<Vec<ChangeRecord>> {
        self.inner.read_changes(object, after, as_of).await
    }
}

/// Events `e00000` to `e{n-1}` (of objects `o0`..`o2`) are committed once each, in one of the
/// two sinks.
async fn assert_each_event_once_in(main: &Flaky, audit: &Flaky, n: usize) {
    let mut keys: Vec<String> = committed(&main.inner, 3).await.into_iter().map(|r| r.key).collect();
    keys.extend(committed(&audit.inner, 3).await.into_iter().map(|r| r.key));
    keys.sort();
    assert_eq!(keys, (0..n).map(|i| format!("e{i:05}")).collect::<Vec<_>>(), "every event once, in one of the sinks");
}

fn ev(obj: &str, key: &str, value: &str) -> Event {
    Event::new(ObjectId::new(obj).expect("valid"), "T", key, value.to_string(), Timestamp::from_millis(1_000))
}

fn events(n: usize) -> Vec<Event> {
    (0..n).map(|i| ev(&format!("o{}", i % 3), &format!("e{i:05}"), &i.to_string())).collect()
}

async fn committed(sink: &MemoryColdStore, objs: usize) -> Vec<ChangeRecord> {
    let mut all = Vec::new();
    for o in 0..objs {
        all.extend(
            sink.read_changes(&ObjectId::new(format!("o{o}")).expect("valid"), 0, AsOf::Latest).await.expect("read"),
        );
    }
    all
}

fn assert_exactly_once(records: &[ChangeRecord], n: usize) {
    let mut keys: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
    keys.sort_unstable();
    let want: Vec<String> = (0..n).map(|i| format!("e{i:05}")).collect();
    assert_eq!(keys, want.iter().map(String::as_str).collect::<Vec<_>>(), "every event exactly once");
    // Per object, sequence numbers follow send order.
    let mut by: std::collections::BTreeMap<&ObjectId, Vec<&ChangeRecord>> = Default::default();
    for r in records {
        by.entry(&r.object).or_default().push(r);
    }
    for rs in by.values() {
        for w in rs.windows(2) {
            assert!(w[0].seq < w[1].seq && w[0].key < w[1].key, "order kept: {} then {}", w[0].key, w[1].key);
        }
    }
}

#[tokio::test]
async fn one_roll_is_one_commit_and_replays_change_nothing() {
    let sink = Flaky::new();
    let p = Pipeline::builder(sink.clone()).build().expect("build");
    assert_eq!(p.send(events(300)).expect("send"), 300);
    let r = p.roll().await.expect("roll");
    assert_eq!((r.commits, r.events, r.replayed), (1, 300, 0));
    assert_eq!(sink.inner.snapshots().await.expect("snaps").len(), 1, "300 events, one snapshot");
    assert_eq!(p.roll().await.expect("empty roll"), RollReport::default());
    assert_exactly_once(&committed(&sink.inner, 3).await, 300);
    let m = p.metrics();
    assert_eq!((m.events_in, m.events_committed, m.rolls, m.buffer_depth), (300, 300, 1, 0));
}

#[tokio::test]
async fn a_lost_commit_reply_is_resolved_without_duplicates() {
    let sink = Flaky::new();
    let p = Pipeline::builder(sink.clone()).build().expect("build");
    p.send(events(50)).expect("send");
    sink.lose_replies.store(2, Ordering::SeqCst);
    let r = p.roll().await.expect("roll retries the same claimed batch");
    // The first attempt landed; the retry skipped everything: committed by this roll, once (a
    // replay is an earlier process's batch).
    assert_eq!((r.events, r.replayed, r.commits), (50, 0, 1), "{r:?}");
    let m = p.metrics();
    assert_eq!((m.events_committed, m.events_replayed), (50, 0), "{m:?}");
    assert_exactly_once(&committed(&sink.inner, 3).await, 50);
    assert_eq!(sink.inner.snapshots().await.expect("snaps").len(), 1);
}

#[tokio::test]
async fn rolls_are_due_by_rows_bytes_and_interval() {
    let clock = ManualClock::new(Timestamp::from_millis(1_000_000));
    let sink = Flaky::new();
    let settings = PipelineSettings {
        roll_interval: Duration::from_millis(200),
        roll_rows: 10,
        roll_bytes: 4096,
        ..Default::default()
    };
    let p = Pipeline::builder(sink.clone())
        .with_settings(settings)
        .with_clock(Arc::new(clock.clone()))
        .build()
        .expect("build");
    assert!(!p.roll_due(), "nothing waiting");
    p.send(events(3)).expect("send");
    assert!(!p.roll_due());
    clock.advance(Duration::from_millis(200));
    assert!(p.roll_due(), "interval elapsed");
    p.roll().await.expect("roll");
    p.send(events(10)).expect("send");
    assert!(p.roll_due(), "row threshold");
    p.roll().await.expect("roll");
    p.send(vec![ev("o0", "big", &"x".repeat(5000))]).expect("send");
    assert!(p.roll_due(), "byte threshold");
    p.roll().await.expect("roll");
    // Thresholds above what the buffer holds: a roll is due once it is half full, by events or
    // by bytes (senders were refused as "full" until the interval passed).
    for (capacity, capacity_bytes, n, value) in [(8, 1 << 20, 4, 1), (1000, 4096, 2, 1100)] {
        let settings = PipelineSettings {
            roll_interval: Duration::from_secs(3600),
            capacity,
            capacity_bytes,
            ..Default::default()
        };
        let p = Pipeline::builder(sink.clone())
            .with_settings(settings)
            .with_clock(Arc::new(clock.clone()))
            .build()
            .expect("build");
        p.send((1..n).map(|i| ev("o0", &format!("h{i}"), &"x".repeat(value))).collect::<Vec<_>>()).expect("send");
        assert!(!p.roll_due(), "below half of capacity {capacity} / {capacity_bytes} bytes");
        p.send(vec![ev("o0", "half", &"x".repeat(value))]).expect("send");
        assert!(p.roll_due(), "half of capacity {capacity} / {capacity_bytes} bytes waits");
    }
    // With `Spill` the capacities are lifted: no roll for half of them.
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = PipelineSettings {
        roll_interval: Duration::from_secs(3600),
        capacity: 8,
        backpressure: Backpressure::Spill(dir.path().join("spill.db")),
        ..Default::default()
    };
    let p = Pipeline::builder(sink.clone())
        .with_settings(spill)
        .with_clock(Arc::new(clock.clone()))
        .build()
        .expect("build");
    p.send((0..6).map(|i| ev("o0", &format!("s{i}"), "x")).collect::<Vec<_>>()).expect("send");
    assert!(!p.roll_due(), "Spill lifts the capacity");
}

#[tokio::test]
async fn transform_filters_maps_and_reroutes() {
    let main = Flaky::new();
    let audit = MemoryColdStore::new();
    let p = Pipeline::builder(main.clone())
        .with_route("audit", Arc::new(audit.clone()))
        .with_transform(|mut e: Event| {
            if e.key.starts_with("skip") {
                Transformed::Drop
            } else if e.type_name == "Audit" {
                Transformed::Route("audit".into(), e)
            } else {
                e.value = format!("{{\"v\":{}}}", String::from_utf8_lossy(&e.value)).into();
                Transformed::Keep(e)
            }
        })
        .build()
        .expect("build");
    let mut batch = vec![ev("o0", "a", "1"), ev("o0", "skip-me", "2")];
    let mut audit_ev = ev("o1", "login", "ok");
    audit_ev.type_name = "Audit".into();
    batch.push(audit_ev);
    assert_eq!(p.send(batch).expect("send"), 2);
    let r = p.roll().await.expect("roll");
    assert_eq!((r.commits, r.events), (2, 2), "one commit per route");
    let main_rows = main.inner.read_changes(&ObjectId::new("o0").expect("valid"), 0, AsOf::Latest).await.expect("read");
    assert_eq!(main_rows.len(), 1);
    assert_eq!(&main_rows[0].value[..], br#"{"v":1}"#);
    assert_eq!(audit.read_changes(&ObjectId::new("o1").expect("valid"), 0, AsOf::Latest).await.expect("read").len(), 1);
    assert_eq!(p.metrics().events_dropped, 1);
    let bad = Pipeline::builder(main.clone())
        .with_transform(|e| Transformed::Route("nowhere".into(), e))
        .build()
        .expect("build");
    assert_eq!(bad.send(vec![ev("o0", "a", "1")]).expect_err("unknown route").kind(), &ErrorKind::InvalidInput);
}

#[tokio::test]
async fn fail_fast_with_a_full_buffer_and_a_stalled_sink() {
    let sink = Flaky::new();
    let settings = PipelineSettings { capacity: 10, backpressure: Backpressure::FailFast, ..Default::default() };
    let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("build");
    p.send(events(10)).expect("fills the buffer");
    let e = p.send(events(1)).expect_err("full");
    assert_eq!(e.kind(), &ErrorKind::Unavailable);
    assert!(e.is_retryable());
    sink.stalled.store(true, Ordering::SeqCst);
    let roll = tokio::time::timeout(Duration::from_secs(30), p.roll()).await.expect("bounded retries");
    assert_eq!(roll.expect_err("stalled sink").kind(), &ErrorKind::Unavailable);
    let e = p.send(events(1)).expect_err("still full: nothing was lost, nothing freed");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable(), "{e}");
    sink.stalled.store(false, Ordering::SeqCst);
    assert_eq!(p.roll().await.expect("recovered").events, 10);
    assert_eq!(p.send(events(5)).expect("room again"), 5);
    assert_eq!(p.metrics().rejected, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_policy_waits_for_room_until_its_deadline() {
    let sink = Flaky::new();
    let settings = PipelineSettings {
        capacity: 10,
        backpressure: Backpressure::Wait(Duration::from_millis(100)),
        ..Default::default()
    };
    let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("build");
    p.send(events(10)).expect("fill");
    sink.stalled.store(true, Ordering::SeqCst);
    let clock = SystemClock::new();
    let t0 = clock.monotonic();
    let e = p.send_wait(events(1)).await.expect_err("deadline");
    let waited = clock.monotonic() - t0;
    assert_eq!(e.kind(), &ErrorKind::Unavailable);
    assert!(waited >= Duration::from_millis(100) && waited < Duration::from_secs(5), "waited {waited:?}");
    assert_eq!(p.metrics().rejected, 1, "a send_wait refused in the end is one rejection, not one per try");
    // The events are transformed once, not once per try (about one per millisecond).
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let settings = PipelineSettings {
        capacity: 10,
        backpressure: Backpressure::Wait(Duration::from_millis(50)),
        ..Default::default()
    };
    let counting = Pipeline::builder(sink.clone())
        .with_settings(settings)
        .with_transform(move |e| {
            counted.fetch_add(1, Ordering::SeqCst);
            Transformed::Keep(e)
        })
        .build()
        .expect("build");
    counting.send(events(10)).expect("fill");
    counting.send_wait(events(1)).await.expect_err("deadline");
    assert_eq!(calls.load(Ordering::SeqCst), 11, "ten for the fill, one for the waiting send");
    // A close while a sender waits ends its wait with `Shutdown` (not its deadline's
    // `Unavailable`), even when close's roll fails.
    let settings = PipelineSettings {
        capacity: 10,
        backpressure: Backpressure::Wait(Duration::from_secs(30)),
        ..Default::default()
    };
    let prepared = Arc::new(AtomicU32::new(0));
    let seen = prepared.clone();
    let closing = Pipeline::builder(sink.clone())
        .with_settings(settings)
        .with_transform(move |e| {
            seen.fetch_add(1, Ordering::SeqCst);
            Transformed::Keep(e)
        })
        .build()
        .expect("build");
    closing.send(events(10)).expect("fill");
    let waiter = tokio::spawn({
        let p = closing.clone();
        async move { p.send_wait(events(1)).await }
    });
    // The waiting send has taken its event (before the pipeline closed: a send that starts
    // after `close` is refused at once, which would not test the wake-up), then waits.
    for _ in 0..5_000 {
        if prepared.load(Ordering::SeqCst) == 11 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(prepared.load(Ordering::SeqCst), 11, "the waiting send never started");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiter.is_finished(), "the send waits for room");
    closing.close().await.expect_err("the stalled sink fails close's roll");
    let e = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("ends at once").expect("join");
    assert_eq!(e.expect_err("closed").kind(), &ErrorKind::Shutdown);
    // Now a roll frees room while a sender waits (on a pipeline with a deadline far beyond
    // the roll, so that only a missing wake-up can fail it).
    sink.stalled.store(false, Ordering::SeqCst);
    let settings = PipelineSettings {
        capacity: 10,
        backpressure: Backpressure::Wait(Duration::from_secs(30)),
        ..Default::default()
    };
    let p = Pipeline::builder(Flaky::new()).with_settings(settings).build().expect("build");
    p.send(events(10)).expect("fill");
    let p2 = p.clone();
    let roller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        p2.roll().await
    });
    assert_eq!(p.send_wait(events(1)).await.expect("room after the roll"), 1);
    roller.await.expect("join").expect("roll");
    assert_eq!(p.metrics().rejected, 0, "a send_wait that got in was not refused");
}

#[tokio::test]
async fn spill_policy_overflows_to_disk_and_keeps_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Flaky::new();
    let settings = PipelineSettings {
        capacity: 10,
        roll_rows: 25,
        backpressure: Backpressure::Spill(dir.path().join("spill.db")),
        ..Default::default()
    };
    let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("build");
    let all = events(100);
    for chunk in all.chunks(7) {
        p.send(chunk.to_vec()).expect("never refused");
    }
    let m = p.metrics();
    assert_eq!(m.buffer_depth, 100);
    assert!(m.buffer_spilled >= 90, "spilled {}", m.buffer_spilled);
    sink.stalled.store(true, Ordering::SeqCst);
    assert!(p.roll().await.is_err());
    sink.stalled.store(false, Ordering::SeqCst);
    let r = p.roll().await.expect("roll");
    assert_eq!(r.events, 100);
    assert_exactly_once(&committed(&sink.inner, 3).await, 100);
    assert_eq!(p.metrics().buffer_spilled, 0);
}

/// A memory pipeline dropped (its process gone) with events in its spill file: the next
/// pipeline opened with that path delivers them, once each and in send order per object (the
/// documented restart promise of `Backpressure::Spill`; the events still in memory are lost).
#[tokio::test]
async fn the_next_pipeline_on_a_spill_file_delivers_what_spilled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Flaky::new();
    let settings = PipelineSettings {
        capacity: 2,
        backpressure: Backpressure::Spill(dir.path().join("spill.db")),
        ..Default::default()
    };
    let all = events(9);
    {
        let p = Pipeline::builder(sink.clone()).with_settings(settings.clone()).build().expect("build");
        for e in &all {
            p.send(vec![e.clone()]).expect("never refused");
        }
        let m = p.metrics();
        assert_eq!((m.buffer_depth, m.buffer_spilled), (9, 7), "{m:?}");
    } // dropped without close: the two events in memory are gone
    let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("reopen");
    assert_eq!(p.metrics().buffer_spilled, 7, "the spilled events wait for the next pipeline");
    assert_eq!(p.roll().await.expect("roll").events, 7);
    let records = committed(&sink.inner, 3).await;
    let keys: Vec<String> = records.iter().map(|r| r.key.clone()).collect();
    let spilled: Vec<String> = all[2..].iter().map(|e| e.key.clone()).collect();
    assert_eq!(records.len(), 7, "each spilled event once: {keys:?}");
    for o in 0..3 {
        let object = format!("o{o}");
        let got: Vec<&str> = records.iter().filter(|r| r.object.as_str() == object).map(|r| r.key.as_str()).collect();
        let sent: Vec<&str> = all[2..].iter().filter(|e| e.object.as_str() == object).map(|e| e.key.as_str()).collect();
        assert_eq!(got, sent, "{object}: in send order ({spilled:?})");
    }
    assert_eq!(p.metrics().buffer_spilled, 0);
}

/// A roll from a spill file claims about `roll_bytes` at a time, not `roll_rows` events
/// whatever their size: memory stays bounded when many large events spilled.
#[tokio::test]
async fn a_roll_from_the_spill_file_claims_at_most_roll_bytes_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Flaky::new();
    let settings = PipelineSettings {
        capacity: 2,
        roll_rows: 100_000,
        roll_bytes: 4 << 20,
        backpressure: Backpressure::Spill(dir.path().join("spill.db")),
        ..Default::default()
    };
    let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("build");
    let big: Vec<Event> = (0..30)
        .map(|i| {
            Event::new(
                ObjectId::new(format!("o{}", i % 3)).expect("valid"),
                "T",
                format!("k{i}"),
                vec![b'x'; 1 << 20],
                Timestamp::EPOCH,
            )
        })
        .collect();
    for e in big {
        p.send(vec![e]).expect("spills");
    }
    assert!(p.metrics().buffer_spilled >= 28, "{:?}", p.metrics());
    let r = p.roll().await.expect("roll");
    assert_eq!(r.events, 30);
    // Each claim holds three 1 MiB events (a fourth would pass 4 MiB), one commit per claim
    // (the first claim takes the two events held in memory).
    assert!(r.commits >= 10, "claims bounded by roll_bytes: {r:?}");
    let records = committed(&sink.inner, 3).await;
    assert_eq!(records.len(), 30, "every event once");
}

/// A durable log reopened after a "crash" delivers what waited, exactly once: events whose
/// commit failed are committed by the next process, and events whose commit landed just before
/// the crash (its reply never came) are found committed and replayed, not committed twice.
#[tokio::test]
async fn durable_log_is_delivered_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Flaky::new();
    let settings =
        PipelineSettings { durability: Durability::Durable(dir.path().join("log.db")), ..Default::default() };
    {
        let p = Pipeline::builder(sink.clone()).with_settings(settings.clone()).build().expect("build");
        p.send(events(40)).expect("send");
        sink.stalled.store(true, Ordering::SeqCst);
        assert!(p.roll().await.is_err(), "stalled");
    } // "crash": dropped with 40 events waiting, none committed
    sink.stalled.store(false, Ordering::SeqCst);
    {
        let p = Pipeline::builder(sink.clone()).with_settings(settings.clone()).build().expect("reopen");
        assert_eq!(p.metrics().buffer_depth, 40);
        p.send(events(45).split_off(40)).expect("more");
        let r = p.close().await.expect("close rolls");
        assert_eq!((r.events, r.replayed), (45, 0), "nothing had landed: {r:?}");
        assert_exactly_once(&committed(&sink.inner, 3).await, 45);
        assert_eq!(p.send(events(1)).expect_err("closed").kind(), &ErrorKind::Shutdown);
    }
    {
        // The commit lands but its reply never comes: the process "crashes" waiting for it.
        let p = Pipeline::builder(sink.clone()).with_settings(settings.clone()).build().expect("reopen");
        p.send(events(60).split_off(45)).expect("send");
        sink.hang_after_commit.store(1, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_millis(200), p.roll()).await.expect_err("the commit never answers");
    }
    assert_exactly_once(&committed(&sink.inner, 3).await, 60);
    let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("reopen after the lost reply");
    assert_eq!(p.metrics().buffer_depth, 15, "the claimed events are still logged");
    p.send(events(62).split_off(60)).expect("more");
    let r = p.close().await.expect("close rolls");
    assert_eq!((r.events, r.replayed), (2, 15), "the landed claim is replayed, not committed again: {r:?}");
    assert_exactly_once(&committed(&sink.inner, 3).await, 62);
}

/// A claimed batch in the durable log whose sequence numbers a claim never assigns (0, a gap,
/// a repeat, above `MAX_SEQ`) is `Corrupt` naming the row, nothing committed: the sink refused
/// it as the caller's `InvalidInput`, and every roll of `run` retried it for ever. The pipeline
/// still opens over it (a build that reads the claim first refused to).
#[tokio::test]
async fn damaged_claimed_sequence_numbers_are_corrupt() {
    for (what, damage) in [
        ("zero", "UPDATE pipeline_log SET seq = 0 WHERE id = (SELECT min(id) FROM pipeline_log)"),
        ("a gap", "UPDATE pipeline_log SET seq = seq + 5 WHERE id = (SELECT max(id) FROM pipeline_log)"),
        ("a repeat", "UPDATE pipeline_log SET seq = 1"),
        ("above MAX_SEQ", "UPDATE pipeline_log SET seq = 17592186044416 WHERE id = (SELECT min(id) FROM pipeline_log)"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = Flaky::new();
        let log = dir.path().join("log.db");
        let settings = PipelineSettings { durability: Durability::Durable(log.clone()), ..Default::default() };
        {
            let p = Pipeline::builder(sink.clone()).with_settings(settings.clone()).build().expect("build");
            p.send((0..3).map(|i| ev("o0", &format!("k{i}"), "v")).collect::<Vec<_>>()).expect("send");
            sink.stalled.store(true, Ordering::SeqCst);
            assert!(p.roll().await.is_err(), "claimed, not committed");
        }
        sink.stalled.store(false, Ordering::SeqCst);
        rusqlite::Connection::open(&log).expect("log").execute(damage, []).expect(what);
        // The pipeline opens (for inspection), the claim due at once; the roll reports the
        // damage, and so does `take_refused` (the batch cannot be taken out: a repair by hand).
        let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("opens over a damaged claim");
        assert!(p.roll_due(), "{what}: the claimed batch is due");
        let e = p.roll().await.expect_err(what);
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{what}: {e}");
        assert!(e.to_string().contains("pipeline log row"), "{what}: names the row: {e}");
        assert!(committed(&sink.inner, 1).await.is_empty(), "{what}: nothing committed");
        assert_eq!(p.take_refused().await.expect_err(what).kind(), &ErrorKind::Corrupt, "{what}");
    }
}

/// A damaged waiting (unclaimed) row of the durable log stops every roll with `Corrupt` naming
/// the row, and `take_refused` says so too: it answered "nothing refused" (`Ok(vec![])`) while
/// no roll could ever go on, with nothing telling the operator the log needs a repair by hand.
/// Once the row is repaired, everything is committed.
#[tokio::test]
async fn a_damaged_waiting_row_is_corrupt_for_take_refused_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Flaky::new();
    let log = dir.path().join("log.db");
    let settings = PipelineSettings { durability: Durability::Durable(log.clone()), ..Default::default() };
    {
        let p = Pipeline::builder(sink.clone()).with_settings(settings.clone()).build().expect("build");
        p.send((0..3).map(|i| ev("o0", &format!("k{i}"), "v")).collect::<Vec<_>>()).expect("send");
    }
    let db = rusqlite::Connection::open(&log).expect("log");
    db.execute("UPDATE pipeline_log SET key = '' WHERE id = (SELECT min(id) + 1 FROM pipeline_log)", [])
        .expect("damage");
    let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("opens over a damaged row");
    let e = p.roll().await.expect_err("a damaged row");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    let e = p.take_refused().await.expect_err("the roll cannot go on");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("log row"), "names the row: {e}");
    assert!(committed(&sink.inner, 1).await.is_empty(), "nothing committed");
    assert_eq!(p.metrics().buffer_depth, 3, "nothing taken out");
    // The repair by hand (docs/errors.md): the row mended, the roll goes on.
    db.execute("UPDATE pipeline_log SET key = 'k1' WHERE key = ''", []).expect("repair");
    assert_eq!(p.roll().await.expect("rolls").events, 3);
    assert!(p.take_refused().await.expect("nothing refused").is_empty());
    // An invalid object id: both name the row too (the repair deletes or mends it by id).
    p.send(vec![ev("o0", "k9", "v")]).expect("send");
    drop(p);
    db.execute("UPDATE pipeline_log SET do_id = 'bad id' WHERE key = 'k9'", []).expect("damage");
    let row: i64 = db.query_row("SELECT id FROM pipeline_log WHERE key = 'k9'", [], |r| r.get(0)).expect("row");
    let p = Pipeline::builder(sink.clone())
        .with_settings(PipelineSettings { durability: Durability::Durable(log.clone()), ..Default::default() })
        .build()
        .expect("opens over a damaged row");
    for e in [p.roll().await.expect_err("a damaged row"), p.take_refused().await.expect_err("a damaged row")] {
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains(&format!("log row {row}")), "names the row: {e}");
    }
}

#[tokio::test]
async fn bad_events_and_settings_are_rejected() {
    let sink = Flaky::new();
    let p = Pipeline::builder(sink.clone()).build().expect("build");
    let big =
        Event::new(ObjectId::new("o").expect("valid"), "T", "k", vec![0u8; MAX_VALUE_BYTES + 1], Timestamp::EPOCH);
    let e = p.send(vec![ev("o", "a", "1"), big]).expect_err("too big");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    assert!(e.to_string().contains("event 1 of the send (object o, key \"k\")"), "names the event: {e}");
    assert_eq!(p.send(vec![ev("o", "", "x")]).expect_err("empty key").kind(), &ErrorKind::InvalidInput);
    // An event the transform made invalid is named as such.
    let t = Pipeline::builder(sink.clone())
        .with_transform(|mut e: Event| {
            e.type_name = String::new();
            Transformed::Keep(e)
        })
        .build()
        .expect("build");
    let e = t.send(vec![ev("o", "k", "x")]).expect_err("no type name after the transform");
    assert!(e.to_string().contains("as the transform returned it"), "{e}");
    assert_eq!(p.metrics().events_in, 0);
    let e = Pipeline::builder(sink.clone())
        .with_settings(PipelineSettings { capacity: 0, ..Default::default() })
        .build()
        .expect_err("capacity 0");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    let e = Pipeline::builder(sink.clone())
        .with_settings(PipelineSettings { token: FencingToken::NONE, ..Default::default() })
        .build()
        .expect_err("token NONE");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    let e = Pipeline::builder(sink.clone())
        .with_settings(PipelineSettings { token: FencingToken::new(FencingToken::MAX.get() + 1), ..Default::default() })
        .build()
        .expect_err("token above the limit");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    // One send larger than the whole buffer can never fit: LimitExceeded, not a retryable
    // "full" that a waiting sender would spin on until its deadline.
    let small = Pipeline::builder(sink)
        .with_settings(PipelineSettings { capacity: 10, backpressure: Backpressure::FailFast, ..Default::default() })
        .build()
        .expect("build");
    let e = small.send(events(11)).expect_err("larger than the buffer");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { limit: 10, actual: 11, .. }), "{e}");
    assert!(!e.is_retryable());
    assert_eq!(small.send(events(10)).expect("exactly the capacity fits"), 10);
    // Refused at the first event past the bound: a long (or endless) iterator is not read on.
    let pulled = std::cell::Cell::new(0u64);
    let endless = (0u64..1000).map(|i| {
        pulled.set(pulled.get() + 1);
        ev(&format!("o{}", i % 3), &format!("e{i:05}"), "v")
    });
    let e = small.send(endless).expect_err("more than the buffer holds");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { limit: 10, actual: 11, .. }), "{e}");
    assert_eq!(pulled.get(), 11, "read up to the first event past the bound");
    // Two routes into one sink would number an object's events alike: refused at build.
    let shared = Flaky::new();
    let e = Pipeline::builder(shared.clone()).with_route("copy", shared).build().expect_err("shared sink");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    assert!(e.to_string().contains("share one sink"), "{e}");
}

/// A durable log that cannot be opened (its directory does not exist) is a permanent error: a
/// host that retries retryable errors must not spin on it.
#[tokio::test]
async fn a_durable_log_that_cannot_be_opened_is_not_retryable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = PipelineSettings {
        durability: Durability::Durable(dir.path().join("no/such/dir/log.db")),
        ..Default::default()
    };
    let e = Pipeline::builder(Flaky::new()).with_settings(settings).build().expect_err("cannot open");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(!e.is_retryable(), "{e}");
}

/// Senders on two threads race `close`: every send that got `Ok` is in the sink once close has
/// returned (close used to roll only what it saw, so a send that passed the closed check just
/// before it was set could be acknowledged and left behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_send_acknowledged_while_closing_is_committed() {
    // Rounds in which senders were still being acknowledged as close was called (a send
    // acknowledged after the count read just before it): rounds that race close.
    let mut raced = 0;
    for round in 0..40 {
        let sink = Flaky::new();
        let p = Pipeline::builder(sink.clone()).build().expect("build");
        let senders: Vec<_> = (0..2)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let mut acked = Vec::new();
                    for i in 0.. {
                        let key = format!("t{t}-{i:07}");
                        match p.send([ev(&format!("o{t}"), &key, "v")]) {
                            Ok(1) => acked.push(key),
                            Ok(n) => panic!("one event sent, {n} accepted"),
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
        // Close once the senders are under way (on a loaded machine they may start late: a
        // round with no send racing close would test nothing).
        while p.metrics().events_in < 20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_micros(50 * round)).await;
        let before_close = p.metrics().events_in;
        p.close().await.expect("close");
        let mut acked: Vec<String> = senders.into_iter().flat_map(|h| h.join().expect("sender")).collect();
        acked.sort_unstable();
        let mut landed: Vec<String> = committed(&sink.inner, 2).await.into_iter().map(|r| r.key).collect();
        landed.sort_unstable();
        raced += u32::from(acked.len() as u64 > before_close);
        assert_eq!(landed.len(), acked.len(), "round {round}: acknowledged sends committed");
        assert_eq!(landed, acked, "round {round}");
    }
    println!("sends still acknowledged as close was called in {raced} of 40 rounds");
    assert!(raced > 0, "no send was acknowledged as close was called: the race was never run");
}

/// `capacity_bytes` bounds the buffer by size whatever the event count: large events fill it
/// long before `capacity` events wait; one send larger than it can never fit; a roll frees room;
/// the spill policy overflows to disk by bytes too.
#[tokio::test]
async fn byte_capacity_bounds_the_buffer_and_spills_by_size() {
    let sink = Flaky::new();
    let big = |i: usize| ev("o0", &format!("b{i:03}"), &"x".repeat(10_000));
    let settings = PipelineSettings { capacity: 1_000, capacity_bytes: 35_000, ..Default::default() };
    let p = Pipeline::builder(sink.clone()).with_settings(settings.clone()).build().expect("build");
    assert_eq!(p.send((0..3).map(big)).expect("three fit"), 3);
    let e = p.send([big(3)]).expect_err("a fourth does not");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable() && e.to_string().contains("bytes"), "{e}");
    let e = p.send((10..14).map(big)).expect_err("never fits");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    assert_eq!(p.metrics().buffer_depth, 3, "nothing of a refused send was taken");
    assert_eq!(p.roll().await.expect("roll").events, 3);
    assert_eq!(p.send([big(3)]).expect("room after the roll"), 1);
    let zero = PipelineSettings { capacity_bytes: 0, ..Default::default() };
    assert_eq!(Pipeline::builder(sink).with_settings(zero).build().expect_err("zero").kind(), &ErrorKind::InvalidInput);

    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Flaky::new();
    let settings = PipelineSettings {
        backpressure: Backpressure::Spill(dir.path().join("spill.db")),
        roll_rows: 1_000,
        ..settings
    };
    let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("build");
    for i in 0..10 {
        p.send([big(i)]).expect("spill never refuses");
    }
    let m = p.metrics();
    assert_eq!((m.buffer_depth, m.buffer_spilled), (10, 7), "3 in memory (35 kB), 7 on disk");
    assert_eq!(p.roll().await.expect("roll").events, 10);
    let got: Vec<String> = sink
        .inner
        .read_changes(&oid_of("o0"), 0, AsOf::Latest)
        .await
        .expect("read")
        .into_iter()
        .map(|r| r.key)
        .collect();
    assert_eq!(got, (0..10).map(|i| format!("b{i:03}")).collect::<Vec<_>>(), "in send order, exactly once");
}

fn oid_of(s: &str) -> ObjectId {
    ObjectId::new(s).expect("valid")
}

/// The durable log counts bytes like the memory buffer (UTF-8 bytes, not characters): after a
/// roll of events with non-ASCII keys the buffer holds 0 bytes again, and never looks full
/// because of a drifting count.
#[tokio::test]
async fn durable_log_byte_count_returns_to_zero_with_non_ascii_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    for durability in [Durability::Durable(dir.path().join("log.db")), Durability::Memory] {
        let sink = Flaky::new();
        let backpressure = Backpressure::Spill(dir.path().join("spill.db"));
        let settings = PipelineSettings { durability, backpressure, capacity: 2, ..Default::default() };
        let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("build");
        let events: Vec<Event> = (0..10).map(|i| ev("o0", &format!("ключ-é-{i}"), "värde-ü")).collect();
        p.send(events).expect("send");
        assert!(p.metrics().buffer_bytes > 0);
        assert_eq!(p.roll().await.expect("roll").events, 10);
        let m = p.metrics();
        assert_eq!((m.buffer_depth, m.buffer_bytes), (0, 0), "{m:?}");
    }
}

/// A durable log holding events for a route the new build does not register is refused at
/// build (every roll would stop at those events); with the route, they are delivered. A
/// transform's dropped events are counted only for sends that were accepted.
#[tokio::test]
async fn a_durable_log_with_an_unregistered_route_is_refused_at_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (main, audit) = (Flaky::new(), MemoryColdStore::new());
    let settings =
        PipelineSettings { durability: Durability::Durable(dir.path().join("log.db")), ..Default::default() };
    {
        let p = Pipeline::builder(main.clone())
            .with_settings(settings.clone())
            .with_route("audit", Arc::new(audit.clone()))
            .with_transform(|e| Transformed::Route("audit".into(), e))
            .build()
            .expect("build");
        p.send(events(3)).expect("send");
    } // the process ends with the audit events unrolled
    let e = Pipeline::builder(main.clone()).with_settings(settings.clone()).build().expect_err("route missing");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("audit"), "{e}");
    let p = Pipeline::builder(main.clone())
        .with_settings(settings)
        .with_route("audit", Arc::new(audit.clone()))
        .build()
        .expect("with the route");
    assert_eq!(p.close().await.expect("close rolls").events, 3);
    assert_eq!(committed(&audit, 3).await.len(), 3);

    let settings = PipelineSettings { capacity: 2, ..Default::default() };
    let p = Pipeline::builder(Flaky::new())
        .with_settings(settings)
        .with_transform(|e| if e.key.ends_with('1') { Transformed::Drop } else { Transformed::Keep(e) })
        .build()
        .expect("build");
    p.send(events(2)).expect("one kept, one dropped");
    p.send(events(1)).expect("fills the buffer");
    assert!(p.send(events(2)).is_err(), "full");
    assert_eq!(p.metrics().events_dropped, 1, "the refused send's dropped event is not counted");
}

/// Over many rolls of many distinct objects (the per-object sequence counters are forgotten
/// once they outnumber four rolls' worth and learned again from the sink), every event lands
/// exactly once, with contiguous sequence numbers.
#[tokio::test]
async fn many_distinct_objects_over_many_rolls_land_exactly_once() {
    let sink = Flaky::new();
    let settings = PipelineSettings { roll_rows: 5, ..Default::default() };
    let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("build");
    for round in 0..12 {
        let evs: Vec<Event> =
            (0..10).map(|i| ev(&format!("o{}", (round * 7 + i) % 40), &format!("r{round}-{i}"), "v")).collect();
        p.send(evs).expect("send");
        p.roll().await.expect("roll");
    }
    let mut total = 0;
    for o in 0..40 {
        let seqs: Vec<u64> = sink
            .inner
            .read_changes(&ObjectId::new(format!("o{o}")).expect("id"), 0, AsOf::Latest)
            .await
            .expect("read")
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "o{o}: contiguous, exactly once");
        total += seqs.len();
    }
    assert_eq!(total, 120);
    // The sequence counters of new objects are learned in one batched read per claim.
    assert_eq!(sink.watermark_calls.load(Ordering::SeqCst), 0, "never one object at a time");
    let batched = sink.watermarks_calls.load(Ordering::SeqCst);
    assert!((1..=24).contains(&batched), "{batched} batched reads for 24 claims");
}

/// With `roll_rows` unbounded (rolls by bytes or time only), a claim learns the sequence counters
/// of at most 65,536 waiting events' objects at a time (it read the whole log for every claim,
/// and never forgot a counter): 70,000 events of as many objects take two batched reads, and
/// each lands once.
#[tokio::test]
async fn an_unbounded_roll_rows_learns_counters_in_bounded_windows() {
    let sink = Flaky::new();
    let settings = PipelineSettings {
        roll_rows: usize::MAX,
        roll_bytes: usize::MAX,
        capacity: 100_000,
        capacity_bytes: usize::MAX,
        ..Default::default()
    };
    let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("build");
    let n = 70_000;
    p.send((0..n).map(|i| ev(&format!("o{i}"), "k", "v"))).expect("send");
    let r = p.roll().await.expect("roll");
    assert_eq!(r.events, n as u64, "{r:?}");
    assert_eq!(sink.watermarks_calls.load(Ordering::SeqCst), 2, "two windows of counters");
    for i in [0, 65_535, 65_536, n - 1] {
        let o = ObjectId::new(format!("o{i}")).expect("id");
        let seqs: Vec<u64> =
            sink.inner.read_changes(&o, 0, AsOf::Latest).await.expect("read").iter().map(|c| c.seq).collect();
        assert_eq!(seqs, [1], "o{i}");
    }
    assert_eq!(p.metrics().events_committed, n as u64);
}

/// A durable log serves one pipeline at a time: a second pipeline on the same log (a failover
/// node on a shared volume, a rebuild while the old instance runs) is refused. Two pipelines
/// numbering batches from one log would commit events at sequence numbers the other already used,
/// and the sink would drop them as replays. Once the first is dropped, the log opens again.
#[tokio::test]
async fn a_durable_log_serves_one_pipeline_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings =
        || PipelineSettings { durability: Durability::Durable(dir.path().join("log.db")), ..Default::default() };
    let sink = MemoryColdStore::new();
    let first = Pipeline::builder(Arc::new(sink.clone())).with_settings(settings()).build().expect("first");
    let e = Pipeline::builder(Arc::new(sink.clone())).with_settings(settings()).build().expect_err("second");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(e.is_retryable(), "{e}");
    first.send(events(3)).expect("send");
    drop(first);
    let again = Pipeline::builder(Arc::new(sink.clone())).with_settings(settings()).build().expect("reopened");
    again.roll().await.expect("roll");
    assert_exactly_once(&committed(&sink, 3).await, 3);
}

/// A durable log whose lock file was deleted (an age-based temp cleaner: the empty lock file is
/// never written, the log is) is locked again at the pipeline's next call, and a second pipeline
/// is refused as before. One that opened the log between a deletion and that call (it made and
/// locked a lock file of its own), and committed from it, leaves the first refusing every call
/// (`Conflict`, not retryable: its sequence counters are stale) until it is opened again; every
/// acknowledged event is committed once. The lock was taken only at open: unlinked, it guarded
/// nothing, and two pipelines committed the same objects' events at the same sequence numbers
/// (one's dropped by the sink as replays of the other's); a first fix locked a replaced lock
/// file again, and the first pipeline went on with counters the second had overtaken.
#[tokio::test]
async fn a_durable_log_whose_lock_file_was_deleted_still_serves_one_pipeline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lock = dir.path().join("log.db.pipeline.lock");
    let settings =
        || PipelineSettings { durability: Durability::Durable(dir.path().join("log.db")), ..Default::default() };
    let sink = MemoryColdStore::new();
    let open = || Pipeline::builder(Arc::new(sink.clone())).with_settings(settings()).build();
    let all = events(9);
    let first = open().expect("first");
    first.send(all[..3].to_vec()).expect("send");
    first.roll().await.expect("roll");
    std::fs::remove_file(&lock).expect("the lock file is deleted");
    first.send(all[3..6].to_vec()).expect("locked again");
    assert!(lock.exists(), "the lock file is made again");
    let e = open().expect_err("a second pipeline");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    // Deleted again, and a second pipeline opens the log before the first's next call, and
    // commits the events the first left in it.
    std::fs::remove_file(&lock).expect("the lock file is deleted");
    let second = open().expect("the second took the lock");
    second.roll().await.expect("roll");
    drop(second);
    let e = first.send(all[6..].to_vec()).expect_err("the first no longer has the log");
    assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Conflict, false), "{e}");
    assert_eq!(first.roll().await.expect_err("nor rolls").kind(), &ErrorKind::Conflict);
    drop(first);
    let third = open().expect("opened again");
    third.send(all[6..].to_vec()).expect("send");
    third.roll().await.expect("roll");
    assert_exactly_once(&committed(&sink, 3).await, 9);
}

/// The roll loop holds the pipeline only while it rolls: once every handle is dropped (without
/// `close`), the loop ends and the durable log opens again. Before, the spawned loop kept the
/// pipeline and its log lock for good, and every later open was `Conflict`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_pipeline_lets_go_of_its_log_though_its_loop_was_spawned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings =
        || PipelineSettings { durability: Durability::Durable(dir.path().join("log.db")), ..Default::default() };
    let sink = MemoryColdStore::new();
    let p = Pipeline::builder(Arc::new(sink.clone())).with_settings(settings()).build().expect("first");
    p.send(events(3)).expect("send");
    let handle = tokio::spawn(p.run());
    drop(p);
    tokio::time::timeout(Duration::from_secs(10), handle).await.expect("the loop ended").expect("join");
    let again = Pipeline::builder(Arc::new(sink.clone())).with_settings(settings()).build().expect("reopened");
    again.close().await.expect("close");
    assert_exactly_once(&committed(&sink, 3).await, 3);
}

/// A log opened through a symlink is the same log: the second pipeline is refused (it took a
/// lock of its own, named after the link, and both numbered batches from one log).
#[cfg(unix)]
#[tokio::test]
async fn a_log_opened_through_a_symlink_is_the_same_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = MemoryColdStore::new();
    let real = dir.path().join("log.db");
    let first = Pipeline::builder(Arc::new(sink.clone()))
        .with_settings(PipelineSettings { durability: Durability::Durable(real.clone()), ..Default::default() })
        .build()
        .expect("first");
    let alias = dir.path().join("alias.db");
    std::os::unix::fs::symlink(&real, &alias).expect("symlink");
    let e = Pipeline::builder(Arc::new(sink.clone()))
        .with_settings(PipelineSettings { durability: Durability::Durable(alias), ..Default::default() })
        .build()
        .expect_err("the same log");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    drop(first);
    // A link made before the log exists (its target missing): the same lock as the real name.
    let (real, alias) = (dir.path().join("later.db"), dir.path().join("later-alias.db"));
    std::os::unix::fs::symlink(&real, &alias).expect("symlink");
    let first = Pipeline::builder(Arc::new(sink.clone()))
        .with_settings(PipelineSettings { durability: Durability::Durable(alias), ..Default::default() })
        .build()
        .expect("through the link");
    let e = Pipeline::builder(Arc::new(sink.clone()))
        .with_settings(PipelineSettings { durability: Durability::Durable(real), ..Default::default() })
        .build()
        .expect_err("the same log by its real name");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    drop(first);
}

/// `run` backs off after failed rolls in a row: a sink that refuses the batch for good is not
/// asked again every tick (it was, about 20 times a second), and the loop rolls again at once
/// after the sink recovers and the pause ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_backs_off_after_failed_rolls() {
    let sink = Flaky::new();
    sink.refusing.store(true, Ordering::SeqCst);
    let settings = PipelineSettings { roll_interval: Duration::from_millis(8), ..Default::default() };
    let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("pipeline");
    p.send(events(3)).expect("send");
    let runner = p.clone();
    let handle = tokio::spawn(async move { runner.run().await });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let tried = sink.appends.load(Ordering::SeqCst);
    // Ticks of 2 ms: without a backoff some 500 appends; with it about 9 (4, 8, 16 ... ms).
    assert!((2..=15).contains(&tried), "appends in one second: {tried}");
    sink.refusing.store(false, Ordering::SeqCst);
    let clock = SystemClock::new();
    let waited = clock.monotonic();
    while p.metrics().events_committed < 3 && clock.monotonic().saturating_sub(waited) < MAX_ROLL_BACKOFF * 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(p.metrics().events_committed, 3, "committed once the sink takes it");
    p.close().await.expect("close");
    handle.await.expect("run ends after close");
}

/// The backoff reaches `MAX_ROLL_BACKOFF` whatever the tick: with a 4 ms roll interval (1 ms
/// ticks) a sink refusing for good is asked about 25 times in 300 s of the clock (the pause
/// stopped doubling at 4,096 ticks, 4.1 s: some 80 times).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the loop runs on another worker
async fn run_backs_off_up_to_the_cap_whatever_the_tick() {
    let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
    let sink = Flaky::new();
    sink.refusing.store(true, Ordering::SeqCst);
    let settings = PipelineSettings { roll_interval: Duration::from_millis(4), ..Default::default() };
    let p = Pipeline::builder(sink.clone())
        .with_settings(settings)
        .with_clock(Arc::new(clock.clone()))
        .build()
        .expect("pipeline");
    p.send(events(3)).expect("send");
    let handle = tokio::spawn(p.run());
    until_true(|| clock.pending_sleeps() > 0).await;
    for _ in 0..6_000 {
        clock.advance(Duration::from_millis(50));
        // In lock-step: the loop (on another worker) has rolled and sleeps again.
        until_true(|| clock.pending_sleeps() > 0).await;
    }
    let tried = sink.appends.load(Ordering::SeqCst);
    assert!((10..=40).contains(&tried), "appends in 300 s of the clock: {tried}");
    drop(p);
    handle.abort();
}

/// The background loop rolls when the roll interval ends, not at its next tick after that: with
/// a 1 s interval (50 ms ticks) and a manual roll 30 ms after the loop's start, the next roll
/// comes 1 s after the manual one. It came at the tick 20 ms later, and end-to-end lag ran up to
/// a tick past the interval plus a commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the loop runs on another worker
async fn the_roll_loop_rolls_when_the_interval_ends_not_at_the_next_tick() {
    let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
    let sink = Flaky::new();
    let settings = PipelineSettings { roll_interval: Duration::from_secs(1), ..Default::default() };
    let p = Pipeline::builder(sink.clone())
        .with_settings(settings)
        .with_clock(Arc::new(clock.clone()))
        .build()
        .expect("pipeline");
    let handle = tokio::spawn(p.run());
    until_true(|| clock.pending_sleeps() > 0).await;
    clock.advance(Duration::from_millis(30));
    p.send(events(1)).expect("send");
    p.roll().await.expect("a manual roll, off the loop's ticks");
    let rolled_at = clock.monotonic();
    p.send(events(1)).expect("send");
    let appends = || sink.appends.load(Ordering::SeqCst);
    let first = appends();
    let mut waited = Duration::ZERO;
    while appends() == first {
        assert!(waited < Duration::from_secs(2), "no roll in 2 s of the clock");
        clock.advance(Duration::from_millis(5));
        waited += Duration::from_millis(5);
        until_true(|| clock.pending_sleeps() > 0).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let at = clock.monotonic().saturating_sub(rolled_at);
    assert!(at >= Duration::from_secs(1), "rolled before the interval ended: {at:?}");
    assert!(at <= Duration::from_millis(1010), "rolled {at:?} after the last roll, not when the interval ended");
    drop(p);
    handle.abort();
}

/// A send the durable log cannot take (here: locked by another connection past its busy
/// timeout) counts in `rejected`, as its metric says; it counted nothing.
#[tokio::test]
async fn a_send_the_log_refuses_counts_as_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log.db");
    let settings = PipelineSettings { durability: Durability::Durable(path.clone()), ..Default::default() };
    let p = Pipeline::builder(Arc::new(MemoryColdStore::new())).with_settings(settings).build().expect("pipeline");
    let other = rusqlite::Connection::open(&path).expect("another connection");
    other.execute_batch("BEGIN EXCLUSIVE").expect("lock the log");
    let e = p.send(events(1)).expect_err("the log is locked");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert_eq!(p.metrics().rejected, 1);
    assert_eq!(p.metrics().events_in, 0);
    other.execute_batch("COMMIT").expect("unlock");
    p.send(events(1)).expect("send");
    assert_eq!(p.metrics().rejected, 1);
}

/// A `close` whose roll fails for a passing reason leaves what waits to the background loop,
/// which keeps rolling it (with its backoff) until the sink takes it, then ends: the loop stopped
/// at `close`, and events waited for a manual `roll` that a host shutting down never makes. A
/// refusal for good ends the loop (a host awaiting it must not wait for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_close_leaves_what_waits_to_the_roll_loop() {
    for for_good in [false, true] {
        let sink = Flaky::new();
        let settings = PipelineSettings { roll_interval: Duration::from_millis(8), ..Default::default() };
        let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("pipeline");
        let runner = p.clone();
        let handle = tokio::spawn(async move { runner.run().await });
        p.send(events(3)).expect("send");
        let flag = if for_good { &sink.refusing } else { &sink.stalled };
        flag.store(true, Ordering::SeqCst);
        p.close().await.expect_err("the sink fails the final roll");
        if !for_good {
            sink.stalled.store(false, Ordering::SeqCst);
        }
        tokio::time::timeout(Duration::from_secs(10), handle).await.expect("the loop ended").expect("join");
        let committed_events = if for_good { 0 } else { 3 };
        assert_eq!(p.metrics().events_committed, committed_events, "for good: {for_good}");
        assert_eq!(p.metrics().buffer_depth, 3 - committed_events, "for good: {for_good}");
    }
}

/// The same when the host drops every handle after the failed `close` (the docs leave what
/// waits to the loop): the loop holds the pipeline and commits the events once the sink takes
/// them. It ended at its next tick, and a memory log's events were gone without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the loop ticks on the system clock
async fn a_failed_close_then_dropped_handles_leave_what_waits_to_the_roll_loop() {
    let sink = Flaky::new();
    let settings = PipelineSettings { roll_interval: Duration::from_millis(8), ..Default::default() };
    let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("pipeline");
    // The loop's future holds no handle of its own.
    let handle = tokio::spawn(p.run());
    p.send(events(3)).expect("send");
    sink.stalled.store(true, Ordering::SeqCst);
    p.close().await.expect_err("the sink fails the final roll");
    drop(p);
    // Longer than a roll's own retries: the loop is between rolls, with no handle left.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sink.stalled.store(false, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(10), handle).await.expect("the loop ended").expect("join");
    assert_exactly_once(&committed(&sink.inner, 5).await, 3);
}

/// The same when `close` fails at once (the sink's watermark read refused, before any commit
/// retry) and the host drops its handles before the loop's next tick: `close` hands the pipeline
/// to the loop then and there. The loop learned of the close only at its next tick, found no
/// pipeline, and ended: the events were gone without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the loop runs on another worker
async fn a_close_that_fails_at_once_then_dropped_handles_leave_what_waits_to_the_roll_loop() {
    let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
    let sink = Flaky::new();
    let p = Pipeline::builder(sink.clone()).with_clock(Arc::new(clock.clone())).build().expect("pipeline");
    let handle = tokio::spawn(p.run());
    // The loop sleeps on the manual clock: it sees nothing of what follows until it is advanced.
    until_true(|| clock.pending_sleeps() > 0).await;
    p.send(events(3)).expect("send");
    sink.failing_watermarks.store(true, Ordering::SeqCst);
    let e = p.close().await.expect_err("the watermark read fails");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    drop(p);
    sink.failing_watermarks.store(false, Ordering::SeqCst);
    for _ in 0..10_000 {
        if handle.is_finished() {
            break;
        }
        clock.advance(Duration::from_millis(50));
        // Real time too: the roll runs on another worker between the clock's sleeps.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::timeout(Duration::from_secs(10), handle).await.expect("the loop ended").expect("join");
    assert_exactly_once(&committed(&sink.inner, 5).await, 3);
}

/// Waits (real time, up to 10 s) until `cond` holds.
#[allow(clippy::disallowed_methods)] // real time: another task gets there
async fn until_true(cond: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(10), "condition not reached in 10 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The committed-events counter counts what reached the sink even when a later batch of the same
/// roll fails (it counted nothing of such a roll, so it lagged the sink for good), and so does
/// the rolls counter ("rolls that committed at least one event": it missed such a roll).
#[tokio::test]
async fn metrics_count_commits_of_a_roll_that_fails_part_way() {
    let sink = Flaky::new();
    sink.refuse_after.store(1, Ordering::SeqCst);
    let settings = PipelineSettings { roll_rows: 10, ..Default::default() };
    let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("pipeline");
    p.send(events(20)).expect("send");
    p.roll().await.expect_err("the second batch is refused");
    assert_eq!(p.metrics().events_committed, 10, "the first batch is in the sink");
    assert_eq!(p.metrics().rolls, 1, "a roll that committed events");
    sink.refuse_after.store(u32::MAX, Ordering::SeqCst);
    p.roll().await.expect("the rest");
    assert_eq!(p.metrics().events_committed, 20);
    assert_eq!(p.metrics().rolls, 2);
    assert_exactly_once(&committed(&sink.inner, 5).await, 20);
}

/// A batch an earlier process claimed, whose first route landed before the second refused it:
/// after the restart, the first route's events count once as replayed (the earlier process
/// committed them) however often the second route fails again, and the second route's as
/// committed once it takes them. The first route's skip was counted as a replay on every retry.
#[tokio::test]
async fn an_inherited_claim_counts_each_route_once_across_failed_rolls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (main, audit) = (Flaky::new(), Flaky::new());
    let settings =
        PipelineSettings { durability: Durability::Durable(dir.path().join("log.db")), ..Default::default() };
    let build = || {
        Pipeline::builder(main.clone())
            .with_settings(settings.clone())
            .with_route("audit", audit.clone())
            .with_transform(|e: Event| {
                if e.key.ends_with(['1', '3', '5']) {
                    Transformed::Route("audit".into(), e)
                } else {
                    Transformed::Keep(e)
                }
            })
            .build()
            .expect("pipeline")
    };
    audit.refusing.store(true, Ordering::SeqCst);
    {
        let p = build();
        p.send(events(6)).expect("send");
        p.roll().await.expect_err("the audit route refuses");
        assert_eq!(p.metrics().events_committed, 3, "the main route landed");
    } // the process ends with the batch claimed
    let p = build();
    for _ in 0..3 {
        p.roll().await.expect_err("the audit route still refuses");
    }
    audit.refusing.store(false, Ordering::SeqCst);
    let r = p.roll().await.expect("the audit route takes it");
    assert_eq!((r.events, r.replayed), (3, 0), "{r:?}");
    let m = p.metrics();
    assert_eq!((m.events_committed, m.events_replayed), (3, 3), "{m:?}");
    assert_each_event_once_in(&main, &audit, 6).await;
}

/// A roll dropped by its caller while a sink committed its batch leaves that commit's outcome
/// open: `take_refused` refuses to hand the events out until a roll has settled it (handed out
/// and sent again, they would get the sequence numbers of the old commit, which may still land
/// in place of the re-sent ones).
#[tokio::test]
async fn events_whose_commit_a_dropped_roll_left_under_way_are_not_taken_out() {
    let sink = Flaky::new();
    let p = Pipeline::builder(sink.clone()).build().expect("pipeline");
    p.send(vec![ev("o0", "k0", "a"), ev("o1", "k1", "b")]).expect("send");
    sink.hang_next.store(true, Ordering::SeqCst);
    let dropped = tokio::time::timeout(std::time::Duration::from_millis(50), p.roll()).await;
    assert!(dropped.is_err(), "the roll was still committing when it was dropped");
    let e = p.take_refused().await.expect_err("the batch's commit may still land");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(e.is_retryable(), "{e}");
    assert_eq!(p.roll().await.expect("a roll settles it").events, 2);
    assert!(p.take_refused().await.expect("nothing claimed").is_empty());
    assert_eq!(p.metrics().buffer_depth, 0);
}

/// A commit whose first attempt's outcome was unknown stays open also when the later attempts
/// fail otherwise (the sink down, or refusing the batch for good): `take_refused` hands nothing
/// out until a roll the sink answers with the batch landed; the first request landing late
/// then loses nothing and doubles nothing (handed out and sent again, the events would have
/// been stored twice, or new events numbered like the late request's skipped as its replays).
#[tokio::test]
async fn an_unknown_outcome_followed_by_other_failures_keeps_the_commit_open() {
    for refused_for_good in [false, true] {
        let sink = Flaky::new();
        let p = Pipeline::builder(sink.clone()).build().expect("pipeline");
        p.send(vec![ev("o0", "k0", "a"), ev("o1", "k1", "b")]).expect("send");
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
        // The first request lands late; the sink comes back.
        assert_eq!(sink.land().await.records_written, 2);
        sink.refusing.store(false, Ordering::SeqCst);
        sink.stalled.store(false, Ordering::SeqCst);
        let r = p.roll().await.expect("a roll settles it");
        // The late request's events, and its commit, count as this process's (its own earlier
        // attempt landed them).
        assert_eq!((r.commits, r.events, r.replayed), (1, 2, 0), "{r:?}");
        assert!(p.take_refused().await.expect("nothing claimed").is_empty());
        p.send(vec![ev("o0", "k2", "c")]).expect("send");
        p.roll().await.expect("roll");
        let got: Vec<(String, u64)> = committed(&sink.inner, 2).await.into_iter().map(|r| (r.key, r.seq)).collect();
        assert_eq!(
            got,
            [("k0".to_string(), 1), ("k2".to_string(), 2), ("k1".to_string(), 1)],
            "refused for good {refused_for_good}: each event once, none lost"
        );
    }
}

/// A pipeline into `main` whose events with keys starting `audit` go to the route "audit".
fn audit_routed(main: &Arc<Flaky>, audit: &Arc<Flaky>, settings: PipelineSettings) -> Pipeline {
    Pipeline::builder(main.clone())
        .with_settings(settings)
        .with_route("audit", audit.clone())
        .with_transform(|e: Event| {
            if e.key.starts_with("audit") {
                Transformed::Route("audit".into(), e)
            } else {
                Transformed::Keep(e)
            }
        })
        .build()
        .expect("pipeline")
}

/// A durable log's batch an earlier process claimed, whose first route (in name order) refuses
/// it for good: a roll of this process asks the routes that have not answered it first, so the
/// refused events come out once each route has answered (the refusing route stopped every roll
/// before the other route was asked, and `take_refused` answered `Conflict` for ever).
#[tokio::test]
async fn an_inherited_batch_whose_first_route_refuses_comes_out_after_one_roll() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (main, audit) = (Flaky::new(), Flaky::new());
    let settings =
        PipelineSettings { durability: Durability::Durable(dir.path().join("log.db")), ..Default::default() };
    let p = audit_routed(&main, &audit, settings.clone());
    main.refusing.store(true, Ordering::SeqCst);
    p.send(vec![ev("o0", "k0", "a"), ev("o1", "audit-1", "b")]).expect("send");
    p.roll().await.expect_err("the main route refuses");
    drop(p);
    let p = audit_routed(&main, &audit, settings.clone());
    assert_eq!(p.take_refused().await.expect_err("not answered yet").kind(), &ErrorKind::Conflict);
    p.roll().await.expect_err("the main route refuses again");
    let taken = p.take_refused().await.expect("each route answered this process");
    let keys: Vec<(&str, &str)> = taken.iter().map(|(r, e)| (r.as_str(), e.key.as_str())).collect();
    assert_eq!(keys, [("", "k0")], "the audit route's event landed");
    drop(p);
    // A durable pipeline closed with events waiting lets go of its log when its handles are
    // dropped, though its loop runs: the next pipeline on the log opens (and delivers them).
    main.refusing.store(false, Ordering::SeqCst);
    main.stalled.store(true, Ordering::SeqCst);
    let p = audit_routed(&main, &audit, settings.clone());
    let handle = tokio::spawn(p.run());
    p.send(vec![ev("o2", "k1", "c")]).expect("send");
    p.close().await.expect_err("the main route is down");
    drop(p);
    // The route stays down: the loop lets go of the pipeline (and its log's lock) between rolls.
    tokio::time::timeout(std::time::Duration::from_secs(20), handle).await.expect("the loop ended").expect("join");
    let p = audit_routed(&main, &audit, settings);
    main.stalled.store(false, Ordering::SeqCst);
    assert_eq!(p.roll().await.expect("the next pipeline delivers").events, 1);
}

/// The same with two routes: a later roll whose commit to the main route is answered does not
/// settle the audit route's commit that a dropped roll left under way (one flag for the whole
/// pipeline was cleared by the main route's answer, and the events were handed out).
#[tokio::test]
async fn a_dropped_commit_to_one_route_is_not_settled_by_another_route() {
    let (main, audit) = (Flaky::new(), Flaky::new());
    let p = audit_routed(&main, &audit, PipelineSettings::default());
    p.send(vec![ev("o0", "k0", "a"), ev("o1", "audit-1", "b")]).expect("send");
    audit.hang_next.store(true, Ordering::SeqCst);
    let dropped = tokio::time::timeout(std::time::Duration::from_millis(50), p.roll()).await;
    assert!(dropped.is_err(), "the roll was still committing to the audit route when it was dropped");
    // The next roll: the main route answers (its commit landed before), the audit route fails for now.
    audit.stalled.store(true, Ordering::SeqCst);
    p.roll().await.expect_err("the audit route is stalled");
    let e = p.take_refused().await.expect_err("the audit route's dropped commit may still land");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(e.to_string().contains("audit"), "{e}");
    audit.stalled.store(false, Ordering::SeqCst);
    p.roll().await.expect("a roll the audit route answers settles it");
    assert!(p.take_refused().await.expect("nothing claimed").is_empty());

    // A route refusing for good ahead of the open one (in route order) does not keep every roll
    // from settling it: the open route is committed first. (Each roll stopped at the main route,
    // and `take_refused` answered `Conflict` for ever.)
    p.send(vec![ev("o2", "k2", "c"), ev("o3", "audit-2", "d")]).expect("send");
    audit.hang_next.store(true, Ordering::SeqCst);
    let dropped = tokio::time::timeout(std::time::Duration::from_millis(50), p.roll()).await;
    assert!(dropped.is_err(), "dropped during the audit route's commit (the main route's landed)");
    main.refusing.store(true, Ordering::SeqCst);
    p.roll().await.expect_err("the main route refuses for good");
    let taken = p.take_refused().await.expect("the audit route was settled first");
    assert!(taken.is_empty(), "both routes' events landed: {taken:?}");
    assert_eq!(
        audit.inner.read_changes(&ObjectId::new("o3").expect("id"), 0, AsOf::Latest).await.expect("audit").len(),
        1
    );
}

/// Events a sink refuses for good stop every roll (their claimed batch goes first);
/// `take_refused` takes out the ones that did not land (here the audit route's; the main
/// route's landed and stay), and the events behind them go on, with sequence numbers following
/// what the sinks hold. Also from a durable log after a restart.
#[tokio::test]
async fn refused_events_are_taken_out_and_the_rest_goes_on() {
    for durable in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (main, audit) = (Flaky::new(), Flaky::new());
        let settings = PipelineSettings {
            durability: if durable { Durability::Durable(dir.path().join("log.db")) } else { Durability::Memory },
            ..Default::default()
        };
        let build = || audit_routed(&main, &audit, settings.clone());
        let mut p = build();
        assert!(p.take_refused().await.expect("nothing claimed").is_empty());
        audit.refusing.store(true, Ordering::SeqCst);
        p.send(vec![ev("o0", "k0", "a"), ev("o0", "audit-1", "b"), ev("o1", "audit-2", "c")]).expect("send");
        p.roll().await.expect_err("the audit route refuses");
        p.send(vec![ev("o1", "audit-3", "d"), ev("o0", "k1", "e")]).expect("send");
        p.roll().await.expect_err("the refused batch goes first");
        if durable {
            drop(p);
            p = build();
            // The batch the earlier process claimed: its commits may have been under way when it
            // ended (a request a remote catalog still holds), so it is handed out only once each
            // of its routes has answered this process.
            let e = p.take_refused().await.expect_err("the routes have not answered this process");
            assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
            assert!(e.is_retryable(), "{e}");
            p.roll().await.expect_err("the audit route refuses again");
        }
        let taken = p.take_refused().await.expect("take");
        let keys: Vec<(&str, &str)> = taken.iter().map(|(r, e)| (r.as_str(), e.key.as_str())).collect();
        assert_eq!(keys, [("audit", "audit-1"), ("audit", "audit-2")], "the main route's event landed");
        audit.refusing.store(false, Ordering::SeqCst);
        let r = p.roll().await.expect("the rest");
        assert_eq!(r.events, 2, "{r:?}");
        let seqs = |v: Vec<ChangeRecord>| v.into_iter().map(|c| (c.key, c.seq)).collect::<Vec<_>>();
        let o0 = ObjectId::new("o0").expect("id");
        let o1 = ObjectId::new("o1").expect("id");
        assert_eq!(
            seqs(main.inner.read_changes(&o0, 0, AsOf::Latest).await.expect("main")),
            [("k0".into(), 1), ("k1".into(), 2)]
        );
        // The audit route's sequence numbers start at 1 again: the taken-out ones never landed.
        assert_eq!(seqs(audit.inner.read_changes(&o1, 0, AsOf::Latest).await.expect("audit")), [("audit-3".into(), 1)]);
        assert!(audit.inner.read_changes(&o0, 0, AsOf::Latest).await.expect("audit").is_empty());
        assert_eq!(p.metrics().buffer_depth, 0);
        // The main route's event counts once: committed by this process, or (after the
        // restart) replayed, since the earlier process committed it.
        let m = p.metrics();
        let want = if durable { (2, 1) } else { (3, 0) };
        assert_eq!((m.events_committed, m.events_replayed), want, "{m:?}");
    }
}

/// A roll dropped by its caller after its commits landed (a host's timeout; here the second
/// route's sink never answers) leaves its batch claimed; the next roll commits it again, each
/// sink skips what landed, and every event counts as committed exactly once: the first route's,
/// counted before the drop, not again; the second route's, uncounted, now (they counted as
/// replays, and `events_committed` stayed short for good).
#[tokio::test]
async fn a_roll_dropped_after_its_commits_landed_counts_each_event_once() {
    let (main, audit) = (Flaky::new(), Flaky::new());
    let p = Pipeline::builder(main.clone())
        .with_route("audit", audit.clone())
        .with_transform(|e: Event| {
            if e.key.ends_with(['1', '3', '5', '7', '9']) {
                Transformed::Route("audit".into(), e)
            } else {
                Transformed::Keep(e)
            }
        })
        .build()
        .expect("pipeline");
    p.send(events(6)).expect("send");
    audit.hang_after_commit.store(1, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_millis(50), p.roll()).await.expect_err("the audit commit never answers");
    assert_eq!(p.metrics().events_committed, 3, "the main route's commit, counted as it landed");
    let r = p.roll().await.expect("roll again");
    assert_eq!((r.events, r.replayed), (3, 0), "{r:?}");
    let m = p.metrics();
    assert_eq!((m.events_committed, m.events_replayed), (6, 0), "{m:?}");
    assert_each_event_once_in(&main, &audit, 6).await;
    // A later batch counts as usual.
    p.send(vec![ev("o0", "e00006", "6")]).expect("send");
    assert_eq!(p.roll().await.expect("roll").events, 1);
    assert_eq!(p.metrics().events_committed, 7);
}

/// Interval rolls go by the clock's monotonic time: after the wall clock is set back an hour,
/// the next roll is still due one interval later (it was due only once the wall clock had
/// caught up, an hour later).
#[tokio::test]
async fn rolls_stay_due_when_the_wall_clock_is_set_back() {
    let manual = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
    let clock = Arc::new(dotdo_core::testkit::SteppedClock::new(manual.clone()));
    let sink = Arc::new(MemoryColdStore::new());
    let settings =
        PipelineSettings { roll_interval: Duration::from_millis(100), roll_rows: 1_000_000, ..Default::default() };
    let p =
        Pipeline::builder(sink.clone()).with_settings(settings).with_clock(clock.clone()).build().expect("pipeline");
    p.send(vec![ev("o0", "e00000", "0")]).expect("send");
    manual.advance(Duration::from_millis(200));
    assert!(p.roll_due());
    p.roll().await.expect("roll");
    clock.set_back(Duration::from_secs(3600));
    p.send(vec![ev("o0", "e00001", "1")]).expect("send");
    assert!(!p.roll_due(), "not before the interval");
    manual.advance(Duration::from_millis(300));
    assert!(p.roll_due(), "due one interval after the last roll, whatever the wall clock says");
}

/// A sink whose watermark of object "full" is at `MAX_SEQ` (its sequence numbers are used up).
#[derive(Debug)]
struct Exhausted {
    inner: MemoryColdStore,
}

#[async_trait]
impl ColdSink for Exhausted {
    async fn append(&self, batch: ColdBatch) -> Result<ColdCommit> {
        self.inner.append(batch).await
    }
    async fn watermark(&self, object: &ObjectId) -> Result<Watermark> {
        if object.as_str() == "full" {
            return Ok(Watermark { through: MAX_SEQ, token: FencingToken::new(1) });
        }
        self.inner.watermark(object).await
    }
    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.inner.snapshots().await
    }
    async fn load_state(&self, object: &ObjectId, as_of: AsOf) -> Result<ColdState> {
        self.inner.load_state(object, as_of).await
    }
    async fn read_changes(&self, object: &ObjectId, after: Seq, as_of: AsOf) -> Result<Vec<ChangeRecord>> {
        self.inner.read_changes(object, after, as_of).await
    }
}

/// An object whose sequence numbers are used up stops the roll with `LimitExceeded` before its
/// event is claimed (a claimed number above `MAX_SEQ` was refused by the sink on every roll,
/// as `InvalidInput`); the events ahead of it are committed.
#[tokio::test]
async fn an_object_out_of_sequence_numbers_is_limit_exceeded() {
    let sink = Arc::new(Exhausted { inner: MemoryColdStore::new() });
    let p = Pipeline::builder(sink.clone()).build().expect("build");
    p.send(vec![ev("ok", "a", "1"), ev("full", "b", "2")]).expect("send");
    let e = p.roll().await.expect_err("no sequence number left for `full`");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    assert!(e.to_string().contains("full"), "{e}");
    let ok = sink.inner.read_changes(&ObjectId::new("ok").expect("id"), 0, AsOf::Latest).await.expect("read");
    assert_eq!(ok.len(), 1, "the event ahead of it was committed");
    let e = p.roll().await.expect_err("still none");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
}

/// Events of an object out of sequence numbers are taken out within `roll_bytes` (the first
/// alone if larger), in memory and from a durable log: one `take_refused` each here.
#[tokio::test]
async fn events_out_of_sequence_numbers_are_taken_out_within_roll_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    for durability in [Durability::Memory, Durability::Durable(dir.path().join("log.db"))] {
        let sink = Arc::new(Exhausted { inner: MemoryColdStore::new() });
        let settings = PipelineSettings { durability: durability.clone(), roll_bytes: 1, ..Default::default() };
        let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("build");
        p.send(vec![ev("full", "b", "2"), ev("full", "c", "3"), ev("ok", "d", "4")]).expect("send");
        p.roll().await.expect_err("no sequence number left for `full`");
        for key in ["b", "c"] {
            let out = p.take_refused().await.expect("take out");
            assert_eq!(out.iter().map(|(_, e)| e.key.as_str()).collect::<Vec<_>>(), [key], "{durability:?}");
        }
        p.roll().await.expect("the event behind them");
        let ok = sink.inner.read_changes(&ObjectId::new("ok").expect("id"), 0, AsOf::Latest).await.expect("read");
        assert_eq!(ok.len(), 1, "{durability:?}");
    }
}

/// `take_refused` takes the events of an object out of sequence numbers out of the way (no
/// batch is claimed: the roll stopped before them), so the events behind them go on; in memory
/// and in a durable log, whose taken-out events stay gone after a reopen.
#[tokio::test]
async fn events_of_an_object_out_of_sequence_numbers_are_taken_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log.db");
    for durability in [Durability::Memory, Durability::Durable(path.clone())] {
        let sink = Arc::new(Exhausted { inner: MemoryColdStore::new() });
        let settings = PipelineSettings { durability: durability.clone(), ..Default::default() };
        let p = Pipeline::builder(sink.clone()).with_settings(settings.clone()).build().expect("build");
        p.send(vec![ev("ok", "a", "1"), ev("full", "b", "2"), ev("full", "c", "3"), ev("ok2", "d", "4")])
            .expect("send");
        p.send(vec![ev("full", "e", "5")]).expect("send");
        let e = p.roll().await.expect_err("no sequence number left for `full`");
        assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
        assert!(e.to_string().contains("take_refused"), "{e}");
        let out = p.take_refused().await.expect("take out");
        let keys: Vec<&str> = out.iter().map(|(_, e)| e.key.as_str()).collect();
        assert_eq!(keys, ["b", "c"], "the two events at the head, not those behind `ok2` ({durability:?})");
        assert!(out.iter().all(|(route, e)| route.is_empty() && e.object.as_str() == "full"));
        assert_eq!(p.metrics().buffer_depth, 2, "ok2's and the later `full` event wait");
        let e = p.roll().await.expect_err("the later `full` event stops the roll again");
        assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
        let ok2 = sink.inner.read_changes(&ObjectId::new("ok2").expect("id"), 0, AsOf::Latest).await.expect("read");
        assert_eq!(ok2.len(), 1, "the event behind them was committed ({durability:?})");
        let p = match durability {
            Durability::Durable(_) => {
                drop(p);
                Pipeline::builder(sink.clone()).with_settings(settings).build().expect("reopen")
            }
            _ => p,
        };
        assert_eq!(p.metrics().buffer_depth, 1, "the taken-out events stay gone ({durability:?})");
        let out = p.take_refused().await.expect("take out");
        assert_eq!(out.iter().map(|(_, e)| e.key.as_str()).collect::<Vec<_>>(), ["e"]);
        assert_eq!(p.metrics().buffer_depth, 0);
        assert!(p.take_refused().await.expect("nothing left").is_empty());
        p.roll().await.expect("nothing waits");
    }
}

/// A durable log file deleted, or replaced by another file (a temp-file cleaner, a backup
/// restored over it), while the pipeline has it open: sends and rolls are `Corrupt` naming the
/// file. (SQLite went on writing to the unlinked file: sends were acknowledged, and lost when
/// the process ended.)
#[tokio::test]
async fn a_durable_log_deleted_or_replaced_while_open_is_corrupt() {
    for replace in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.db");
        let settings = PipelineSettings { durability: Durability::Durable(path.clone()), ..Default::default() };
        let p = Pipeline::builder(Flaky::new()).with_settings(settings).build().expect("pipeline");
        p.send(vec![ev("o", "k0", "a")]).expect("send");
        if replace {
            let other = dir.path().join("other.db");
            std::fs::copy(&path, &other).expect("copy");
            std::fs::rename(&other, &path).expect("replace");
        } else {
            std::fs::remove_file(&path).expect("delete");
        }
        let e = p.send(vec![ev("o", "k1", "b")]).expect_err("the file is gone");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "replace {replace}: {e}");
        assert!(e.to_string().contains(&path.display().to_string()), "names the file: {e}");
        let e = p.roll().await.expect_err("the file is gone");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "replace {replace}: {e}");
    }
}

/// The file watched is the one the log opened: a durable log opened through a symlinked
/// directory (a release directory `current`) goes on when the link is retargeted (it was
/// `Corrupt`: the path now named another file). A spill log's file is not watched: a cleaner
/// removing the unused spill file leaves the events in memory going on (they stopped).
#[tokio::test]
async fn a_log_is_watched_as_opened_and_a_spill_file_not_at_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, current) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("current"));
    std::fs::create_dir(&a).expect("a");
    std::fs::create_dir(&b).expect("b");
    std::os::unix::fs::symlink(&a, &current).expect("link");
    let sink = Flaky::new();
    let settings = PipelineSettings { durability: Durability::Durable(current.join("log.db")), ..Default::default() };
    let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("pipeline");
    p.send(vec![ev("o", "k0", "a")]).expect("send");
    std::fs::remove_file(&current).expect("unlink");
    std::os::unix::fs::symlink(&b, &current).expect("retarget");
    p.send(vec![ev("o", "k1", "b")]).expect("the opened file is still there");
    assert_eq!(p.roll().await.expect("roll").events, 2);

    let spill = dir.path().join("spill.db");
    let settings =
        PipelineSettings { backpressure: Backpressure::Spill(spill.clone()), capacity: 4, ..Default::default() };
    let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("pipeline");
    std::fs::remove_file(&spill).expect("a cleaner removes the spill file");
    p.send(vec![ev("s", "k0", "a"), ev("s", "k1", "b")]).expect("send to memory");
    assert_eq!(p.roll().await.expect("roll").events, 2);
}

/// A user's sink that reports no records written (a sloppy `ColdCommit`) while sends keep
/// arriving: each of its commits sends one more event through the pipeline.
struct Underreporting {
    inner: MemoryColdStore,
    pipeline: std::sync::OnceLock<Pipeline>,
    appends: AtomicU32,
}

impl std::fmt::Debug for Underreporting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Underreporting").finish_non_exhaustive()
    }
}

#[async_trait]
impl ColdSink for Underreporting {
    async fn append(&self, batch: ColdBatch) -> Result<ColdCommit> {
        let n = self.appends.fetch_add(1, Ordering::SeqCst);
        let mut c = self.inner.append(batch).await?;
        (c.records_written, c.records_skipped) = (0, 0);
        if n < 50 {
            let p = self.pipeline.get().expect("set");
            p.send(vec![ev("o0", &format!("t{n:05}"), "x")]).expect("steady sends");
        }
        Ok(c)
    }
    async fn watermark(&self, object: &ObjectId) -> Result<Watermark> {
        self.inner.watermark(object).await
    }
    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.inner.snapshots().await
    }
    async fn load_state(&self, object: &ObjectId, as_of: AsOf) -> Result<ColdState> {
        self.inner.load_state(object, as_of).await
    }
    async fn read_changes(&self, object: &ObjectId, after: Seq, as_of: AsOf) -> Result<Vec<ChangeRecord>> {
        self.inner.read_changes(object, after, as_of).await
    }
}

/// A roll commits the events waiting at its start, counted by what it claimed, not by what the
/// sink reports landed: with a sink that reports nothing written and sends arriving during each
/// commit, a roll went on claiming the new events until the sends stopped (for ever under
/// steady traffic); a batch committed again after an earlier roll failed reports its counted
/// routes as nothing landed, too.
#[tokio::test]
async fn a_roll_ends_with_what_waited_at_its_start_whatever_the_sink_reports() {
    for durable in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = Arc::new(Underreporting {
            inner: MemoryColdStore::new(),
            pipeline: std::sync::OnceLock::new(),
            appends: AtomicU32::new(0),
        });
        let durability = if durable { Durability::Durable(dir.path().join("log.db")) } else { Durability::Memory };
        let settings = PipelineSettings { durability, roll_rows: 1, ..Default::default() };
        let p = Pipeline::builder(sink.clone()).with_settings(settings).build().expect("pipeline");
        sink.pipeline.set(p.clone()).expect("once");
        p.send(vec![ev("o0", "k0", "a"), ev("o0", "k1", "b")]).expect("send");
        let report =
            tokio::time::timeout(Duration::from_secs(30), p.roll()).await.expect("the roll ends").expect("roll");
        assert_eq!(report.commits, 2, "durable {durable}: the two events waiting, one batch each");
        assert_eq!(sink.appends.load(Ordering::SeqCst), 2, "durable {durable}: no event sent during the roll");
        let keys: Vec<String> = committed(&sink.inner, 1).await.into_iter().map(|r| r.key).collect();
        assert_eq!(keys, ["k0", "k1"], "durable {durable}");
    }
}

/// A batch an earlier process claimed (in a durable log) makes a roll due at once, as it does
/// for the Arrow pipeline: it waited for the roll interval (or rows enough) behind a few events,
/// while it may be in the sink already and `take_refused` answered `Conflict` about it.
#[tokio::test]
async fn an_inherited_claim_makes_a_roll_due_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Flaky::new();
    let settings = PipelineSettings {
        durability: Durability::Durable(dir.path().join("log.db")),
        roll_interval: Duration::from_secs(300),
        ..Default::default()
    };
    let clock = ManualClock::new(Timestamp::from_millis(1_000));
    let open = || {
        Pipeline::builder(sink.clone())
            .with_settings(settings.clone())
            .with_clock(Arc::new(clock.clone()))
            .build()
            .expect("pipeline")
    };
    let p = open();
    p.send(vec![ev("o0", "k0", "a")]).expect("send");
    assert!(!p.roll_due(), "one event, the interval not passed");
    // (Refused rather than down: the sink's retries would wait on the manual clock.)
    sink.refusing.store(true, Ordering::SeqCst);
    p.roll().await.expect_err("the sink refuses");
    assert!(p.roll_due(), "the claimed batch waits to be committed");
    drop(p);
    let p = open();
    assert!(p.roll_due(), "the batch the earlier pipeline claimed");
    sink.refusing.store(false, Ordering::SeqCst);
    assert_eq!(p.roll().await.expect("roll").events, 1);
    assert!(!p.roll_due(), "nothing waits");
}
