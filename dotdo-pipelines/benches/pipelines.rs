//! Pipeline benchmarks, each beside a raw baseline measured in the same run:
//! * `send` of one event in memory mode (p50 / p99, events/s on one core) vs an unbounded std
//!   channel send of the same event;
//! * durable mode (batches of 100 events per `send`) vs raw rusqlite inserting the same rows in
//!   one transaction per batch;
//! * end-to-end lag at a 1 s roll into a local Iceberg table vs the goal (roll interval + commit
//!   time).
//!
//! Run through `scripts/bench`.

use std::sync::Arc;
use std::time::Duration;

use dotdo_core::testkit::bench::{ms, record, record_goal, sample_pair, us};
use dotdo_core::*;
use dotdo_pipelines::*;

/// A sink that keeps nothing (the send path is what is measured), with correct watermarks.
#[derive(Debug, Default)]
struct Discard;

#[async_trait::async_trait]
impl ColdSink for Discard {
    async fn append(&self, batch: ColdBatch) -> Result<ColdCommit> {
        let mut watermarks = std::collections::BTreeMap::new();
        let mut n = 0;
        for oc in batch.objects {
            n += oc.records.len() as u64;
            if let Some(last) = oc.records.last() {
                watermarks.insert(oc.object.clone(), Watermark { through: last.seq, token: oc.token });
            }
        }
        Ok(ColdCommit { snapshot: Some(1), records_written: n, records_skipped: 0, watermarks })
    }
    async fn watermark(&self, _object: &ObjectId) -> Result<Watermark> {
        Ok(Watermark::default())
    }
    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(Vec::new())
    }
    async fn load_state(&self, _object: &ObjectId, _as_of: AsOf) -> Result<ColdState> {
        Ok(ColdState::default())
    }
    async fn read_changes(&self, _object: &ObjectId, _after: Seq, _as_of: AsOf) -> Result<Vec<ChangeRecord>> {
        Ok(Vec::new())
    }
}

fn event(i: u64, now: Timestamp) -> Event {
    Event {
        object: ObjectId::new(format!("obj-{}", i % 64)).expect("valid"),
        type_name: "Counter".into(),
        key: "n".into(),
        value: bytes::Bytes::from_static(br#"{"n":42}"#),
        timestamp: now,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
    let clock = SystemClock::new();
    let now = clock.now();
    let objects: Vec<ObjectId> = (0..64).map(|i| ObjectId::new(format!("obj-{i}")).expect("valid")).collect();

    // Memory mode send vs an unbounded channel.
    let settings = PipelineSettings {
        capacity: 50_000_000,
        roll_interval: Duration::from_secs(3600),
        roll_rows: 50_000_000,
        roll_bytes: usize::MAX,
        ..Default::default()
    };
    let p = Pipeline::builder(Arc::new(MemoryColdStore::new())).with_settings(settings).build().expect("pipeline");
    // Unbounded: it allocates as it fills, like the pipeline's buffer (a bounded `sync_channel`
    // allocates all its slots when created, outside the timed sends).
    let (tx, rx) = std::sync::mpsc::channel::<Event>();
    let mut i = 0u64;
    let mut j = 0u64;
    let template = event(0, now);
    let (ours, base) = sample_pair(
        10_000,
        1_000_000,
        10_000,
        || {
            i += 1;
            let mut e = template.clone();
            e.object = objects[(i % 64) as usize].clone();
            p.send(std::iter::once(e)).expect("send");
        },
        || {
            j += 1;
            let mut e = template.clone();
            e.object = objects[(j % 64) as usize].clone();
            tx.send(e).expect("channel");
        },
    );
    // Steady state: the buffer is drained every 10k sends (a roll into a sink that keeps
    // nothing, and a channel drain), so memory is reused as it is in a running pipeline; the
    // drain itself is one call in 10k, beyond the p99.
    let drained = Pipeline::builder(Arc::new(Discard))
        .with_settings(PipelineSettings { capacity: 50_000_000, ..Default::default() })
        .build()
        .expect("pipeline");
    let (mut a, mut b) = (0u64, 0u64);
    let (steady, steady_base) = sample_pair(
        10_000,
        1_000_000,
        10_000,
        || {
            a += 1;
            let mut e = template.clone();
            e.object = objects[(a % 64) as usize].clone();
            drained.send(std::iter::once(e)).expect("send");
            if a.is_multiple_of(10_000) {
                rt.block_on(drained.roll()).expect("roll");
            }
        },
        || {
            b += 1;
            let mut e = template.clone();
            e.object = objects[(b % 64) as usize].clone();
            tx.send(e).expect("channel");
            if b.is_multiple_of(10_000) {
                std::hint::black_box(rx.try_iter().count());
            }
        },
    );
    record(
        "pipelines/send_memory_steady_p99",
        "us",
        us(steady.p99()),
        "std_channel_send_steady",
        us(steady_base.p99()),
    );
    drop(rx);
    record("pipelines/send_memory_p50", "us", us(ours.p50()), "std_channel_send", us(base.p50()));
    record("pipelines/send_memory_p99", "us", us(ours.p99()), "std_channel_send", us(base.p99()));
    record("pipelines/send_memory_throughput", "events/s", ours.ops_per_sec(), "std_channel_send", base.ops_per_sec());
    drop(p);

    // Durable mode: batches of 100 events.
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = PipelineSettings {
        capacity: 50_000_000,
        roll_interval: Duration::from_secs(3600),
        roll_rows: 50_000_000,
        roll_bytes: usize::MAX,
        durability: Durability::Durable(dir.path().join("log.db")),
        ..Default::default()
    };
    let p =
        Pipeline::builder(Arc::new(MemoryColdStore::new())).with_settings(settings).build().expect("durable pipeline");
    let raw = rusqlite::Connection::open(dir.path().join("raw.db")).expect("raw");
    raw.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA wal_autocheckpoint=16384;
         CREATE TABLE log (id INTEGER PRIMARY KEY, route TEXT, do_id TEXT, type TEXT, key TEXT, value BLOB, ts INTEGER, batch INTEGER, seq INTEGER);",
    )
    .expect("schema");
    let batch: Vec<Event> = (0..100).map(|k| event(k, now)).collect();
    // Each side takes an owned batch made before the timing, and drops it in its window (a
    // clone per call timed ours only: the raw side borrowed one batch).
    let (warmup, iters) = (100, 3_000);
    let mut ours_batches: Vec<Vec<Event>> = (0..warmup + iters).map(|_| batch.clone()).collect();
    let mut raw_batches = ours_batches.clone();
    let (ours, base) = sample_pair(
        warmup,
        iters,
        100,
        || {
            p.send(ours_batches.pop().expect("a batch")).expect("durable send");
        },
        || {
            let batch = raw_batches.pop().expect("a batch");
            let tx = raw.unchecked_transaction().expect("tx");
            {
                let mut st = tx
                    .prepare_cached(
                        "INSERT INTO log (route, do_id, type, key, value, ts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )
                    .expect("prepare");
                for e in &batch {
                    st.execute(rusqlite::params![
                        "",
                        e.object.as_str(),
                        e.type_name,
                        e.key,
                        &e.value[..],
                        e.timestamp.as_micros()
                    ])
                    .expect("insert");
                }
            }
            tx.commit().expect("commit");
        },
    );
    record(
        "pipelines/send_durable_batch100_throughput",
        "events/s",
        ours.ops_per_sec() * 100.0,
        "rusqlite_batch_insert",
        base.ops_per_sec() * 100.0,
    );
    record("pipelines/send_durable_batch100_p50", "us", us(ours.p50()), "rusqlite_batch_insert", us(base.p50()));
    drop(p);

    // End-to-end lag at a 1 s roll into a local Iceberg table.
    let wh = dir.path().join("warehouse");
    std::fs::create_dir_all(&wh).expect("dir");
    let cold = rt
        .block_on(
            dotdo_iceberg::IcebergColdStore::builder(wh.to_str().expect("utf-8")).table(["bench"], "events").build(),
        )
        .expect("iceberg");
    let settings = PipelineSettings { roll_interval: Duration::from_secs(1), ..Default::default() };
    let p = Pipeline::builder(Arc::new(cold)).with_settings(settings).build().expect("pipeline");
    let runner = p.clone();
    let handle = rt.spawn(async move { runner.run().await });
    let mut lags = Vec::new();
    let mut commits = Vec::new();
    let mut last_rolls = 0;
    let mut k = 0u64;
    let start = clock.monotonic();
    while clock.monotonic() - start < Duration::from_millis(5_500) {
        for _ in 0..100 {
            k += 1;
            p.send(std::iter::once(event(k, clock.now()))).expect("send");
        }
        std::thread::sleep(Duration::from_millis(2));
        let m = p.metrics();
        if m.rolls > last_rolls {
            last_rolls = m.rolls;
            lags.push(m.last_lag);
            commits.push(m.last_commit_latency);
        }
    }
    rt.block_on(p.close()).expect("close");
    handle.abort();
    // About five rolls in 5.5 s at a 1 s interval: a median of fewer is no median (and none
    // would record a lag of 0).
    assert!(lags.len() >= 3, "only {} rolls seen in 5.5 s", lags.len());
    lags.sort_unstable();
    commits.sort_unstable();
    let lag = lags.get(lags.len() / 2).copied().unwrap_or_default();
    let commit = commits.get(commits.len() / 2).copied().unwrap_or_default();
    // A bound, not a peer: an event waits at most about one roll interval plus one commit.
    record_goal(
        "pipelines/end_to_end_lag_1s_roll_p50",
        "ms",
        ms(lag),
        "roll_interval_plus_commit",
        1000.0 + ms(commit),
    );
}
