//! Cold table maintenance: compaction (a `replace` snapshot) keeps every row, exactly once,
//! also with a concurrent appender; collapse drops only superseded versions; schema evolution of
//! user tables reads old files correctly.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use dotdo_core::{
    AsOf, ChangeRecord, ColdBatch, ColdSink, ErrorKind, FencingToken, IndexAccelerator, ObjectChanges, ObjectId, Op,
    Timestamp,
};
use dotdo_iceberg::{CollapseOptions, CompactOptions, IcebergColdStore, Progress, Settings};
use iceberg::spec::Operation;
use proptest::prelude::*;

async fn open(dir: &std::path::Path, buckets: u32) -> IcebergColdStore {
    IcebergColdStore::builder(dir.to_str().expect("utf-8"))
        .table(["m"], "changes")
        // The cleanup tests control every writer, so they may clean up with no retention.
        .settings(Settings { buckets, min_cleanup_retention: std::time::Duration::ZERO, ..Default::default() })
        .build()
        .await
        .expect("open")
}

/// A partition's rows are written in chunks the rolling writer can end a file between:
/// `target_file_size` holds also for a partition whose values make most of its bytes (64 values
/// of 256 KiB at a 1 MiB target: many files, not one of 16 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_are_split_at_the_target_file_size() {
    use rand::RngCore;
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["m"], "changes")
        .settings(Settings { buckets: 1, target_file_size: 1 << 20, ..Default::default() })
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    let mut rng = rand::thread_rng();
    let records: Vec<_> = (1..=64u64)
        .map(|seq| {
            let mut value = vec![0u8; 256 << 10];
            rng.fill_bytes(&mut value);
            dotdo_core::ChangeRecord {
                value: bytes::Bytes::from(value),
                ..common::put(&o, seq, &format!("k{seq}"), "", 1)
            }
        })
        .collect();
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), records)).await.expect("append");
    let files = live_files(&cold).await;
    assert!(files >= 8, "{files} data files for 16 MiB at a 1 MiB target");
    assert_eq!(cold.load_state(&o, AsOf::Latest).await.expect("state").entries.len(), 64);
}

/// Live data files of the current snapshot.
async fn live_files(cold: &IcebergColdStore) -> usize {
    let t = cold.refresh().await.expect("refresh");
    let Some(s) = t.metadata().current_snapshot() else { return 0 };
    let list = t.manifest_list_reader(s).load().await.expect("list");
    let mut n = 0;
    for mf in list.entries() {
        let m = mf.load_manifest(t.file_io()).await.expect("manifest");
        n += m.entries().iter().filter(|e| e.is_alive()).count();
    }
    n
}

/// Everything dotdo can read about `objects`: full history, state and per-key lookups.
async fn content(cold: &IcebergColdStore, objects: &[ObjectId], as_of: AsOf) -> Vec<String> {
    let mut out = Vec::new();
    for o in objects {
        let changes = cold.read_changes(o, 0, as_of).await.expect("read_changes");
        let keys: std::collections::BTreeSet<String> = changes.iter().map(|r| r.key.clone()).collect();
        out.push(format!("{o} changes {changes:?}"));
        let state = cold.load_state(o, as_of).await.expect("state");
        out.push(format!("{o} state {:?} through {}", state.entries, state.through));
        out.push(format!("{o} watermark {:?}", cold.watermark(o).await.expect("wm")));
        for k in keys {
            let l = cold.lookup(o, &k, as_of).await.expect("lookup");
            out.push(format!("{o}/{k} {:?}", l.value));
        }
    }
    out
}

/// A random history: `commits` of (object index, key index, delete?) writes.
fn history() -> impl Strategy<Value = Vec<Vec<(usize, usize, bool)>>> {
    prop::collection::vec(prop::collection::vec((0..5usize, 0..4usize, prop::bool::weighted(0.2)), 1..8), 3..14)
}

fn batches(objects: &[ObjectId], history: &[Vec<(usize, usize, bool)>]) -> Vec<ColdBatch> {
    let mut seqs = vec![0u64; objects.len()];
    let mut clock = 1_000i64;
    history
        .iter()
        .map(|commit| {
            let mut per: BTreeMap<usize, Vec<ChangeRecord>> = BTreeMap::new();
            for &(o, k, del) in commit {
                seqs[o] += 1;
                clock += 10;
                let mut r = common::put(&objects[o], seqs[o], &format!("k{k}"), &format!("v{}", seqs[o]), 1);
                r.timestamp = Timestamp::from_millis(clock);
                if del {
                    r.op = Op::Delete;
                    r.value = bytes::Bytes::new();
                }
                per.entry(o).or_default().push(r);
            }
            ColdBatch {
                objects: per
                    .into_iter()
                    .map(|(o, records)| ObjectChanges {
                        object: objects[o].clone(),
                        token: FencingToken::new(1),
                        records,
                    })
                    .collect(),
            }
        })
        .collect()
}

fn objects() -> Vec<ObjectId> {
    (0..5).map(|i| ObjectId::new(format!("obj:{i}")).expect("id")).collect()
}

/// A 2-bucket table in a fresh directory with `history` appended.
async fn written(
    history: &[Vec<(usize, usize, bool)>],
) -> (tempfile::TempDir, IcebergColdStore, Vec<ObjectId>, Vec<ColdBatch>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 2).await;
    let objects = objects();
    let batches = batches(&objects, history);
    for b in &batches {
        cold.append(b.clone()).await.expect("append");
    }
    (dir, cold, objects, batches)
}

proptest! {
    // 12 cases by default; half of `DOTDO_PROPTEST_CASES` (set by `DOTDO_SOAK=1 scripts/test`),
    // as for the cold conformance kit's models, for more.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("DOTDO_PROPTEST_CASES").ok().and_then(|v| v.parse::<u32>().ok()).map_or(12, |c| (c / 2).max(1)),
        ..ProptestConfig::default()
    })]

    /// Property: compaction of a random table leaves every read identical (history, state,
    /// lookups, watermarks, time travel to before it), commits a `replace` snapshot, reduces
    /// the file count, and exactly-once appends continue after it.
    #[test]
    fn compaction_preserves_content(history in history()) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        rt.block_on(async {
            let (_dir, cold, objects, batches) = written(&history).await;
            let before_snapshot = cold.refresh().await.expect("t").metadata().current_snapshot_id().expect("head");
            let before = content(&cold, &objects, AsOf::Latest).await;
            let files_before = live_files(&cold).await;
            let report = cold.compact(CompactOptions::default()).await.expect("compact");
            let files_after = live_files(&cold).await;
            let after = content(&cold, &objects, AsOf::Latest).await;
            prop_assert_eq!(&before, &after);
            prop_assert_eq!(report.records_read, report.records_written);
            // Both partitions with 2+ files are merged into one file each.
            prop_assert!(files_after <= 2, "{files_before} -> {files_after}: {report:?}");
            if let Some(snap) = report.snapshot {
                prop_assert!(files_after < files_before);
                prop_assert_eq!(report.files_removed as usize - report.files_added as usize, files_before - files_after);
                let t = cold.refresh().await.expect("t");
                let s = t.metadata().snapshot_by_id(snap).expect("snapshot");
                prop_assert_eq!(s.summary().operation.clone(), Operation::Replace);
                prop_assert_eq!(s.parent_snapshot_id(), Some(before_snapshot));
                // The added-records of a rewrite are not new records.
                let infos = cold.snapshots().await.expect("snapshots");
                prop_assert_eq!(infos.last().expect("last").added_records, 0);
                // Time travel to before the compaction still reads the old files.
                prop_assert_eq!(content(&cold, &objects, AsOf::Snapshot(before_snapshot)).await, before.clone());
            } else {
                prop_assert_eq!(files_before, files_after);
            }
            // Exactly once continues: replaying every batch writes nothing.
            for b in &batches {
                let c = cold.append(b.clone()).await.expect("replay");
                prop_assert_eq!(c.records_written, 0);
            }
            // A second compaction finds nothing to do.
            prop_assert_eq!(cold.compact(CompactOptions::default()).await.expect("again").snapshot, None);
            Ok(())
        })?;
    }

    /// Property: collapse keeps every object's latest state and every lookup, and drops
    /// exactly the versions superseded at or before the horizon.
    #[test]
    fn collapse_keeps_latest_state(history in history(), cut in 0i64..=110) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        rt.block_on(async {
            let (_dir, cold, objects, batches) = written(&history).await;
            let all: Vec<ChangeRecord> = batches.iter().flat_map(|b| b.objects.iter().flat_map(|o| o.records.clone())).collect();
            // A horizon anywhere from before the first record (cut 0) to after the last (cut
            // above 100), so that collapse drops nothing, some versions, or every superseded one.
            let min_ts = all.iter().map(|r| r.timestamp.as_micros()).min().unwrap_or(0);
            let max_ts = all.iter().map(|r| r.timestamp.as_micros()).max().unwrap_or(0);
            let horizon = Timestamp::from_micros(min_ts - 1 + (max_ts - min_ts + 1) * cut / 100);
            let mut states = Vec::new();
            for o in &objects {
                states.push(cold.load_state(o, AsOf::Latest).await.expect("state").entries);
            }
            let report = cold.collapse(CollapseOptions::new(horizon)).await.expect("collapse");
            // Model: a version survives unless the next version of its key is at or before the
            // horizon, or it is a latest delete at or before it.
            let mut expected = 0u64;
            for r in &all {
                let next = all.iter().filter(|n| n.object == r.object && n.key == r.key && n.seq > r.seq).min_by_key(|n| n.seq);
                let keep = match next {
                    Some(n) => n.timestamp > horizon,
                    None => !(r.op == Op::Delete && r.timestamp <= horizon),
                };
                expected += u64::from(keep);
            }
            prop_assert_eq!(report.records_read, all.len() as u64);
            prop_assert_eq!(report.records_written, expected);
            let mut remaining = 0u64;
            for (o, state) in objects.iter().zip(&states) {
                let after = cold.load_state(o, AsOf::Latest).await.expect("state");
                prop_assert_eq!(&after.entries, state);
                // A restore continues after the watermark even if collapse dropped the newest
                // records of the object.
                prop_assert_eq!(after.through, cold.watermark(o).await.expect("wm").through);
                remaining += cold.read_changes(o, 0, AsOf::Latest).await.expect("changes").len() as u64;
                for e in state {
                    let l = cold.lookup(o, &e.key, AsOf::Latest).await.expect("lookup");
                    prop_assert_eq!(l.value.map(|v| v.value), Some(e.value.clone()));
                }
            }
            prop_assert_eq!(remaining, expected);
            let t = cold.refresh().await.expect("t");
            let op = t.metadata().current_snapshot().expect("head").summary().operation.clone();
            prop_assert_eq!(op, Operation::Overwrite);
            Ok(())
        })?;
    }
}

/// A concurrent append lands between compaction's read and its commit (forced from the
/// progress callback): the compaction rebuilds its manifests on the new head, and no row is
/// lost or duplicated. Then a free-running appender races a second compaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_during_compaction_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 2).await;
    // A second store on the same warehouse and catalog: another process, as far as the table
    // knows.
    let other = open(dir.path(), 2).await;
    let objects = objects();
    let mut seqs = vec![0u64; objects.len()];
    let next = |i: usize, seqs: &mut Vec<u64>| {
        seqs[i] += 1;
        ColdBatch::single(
            objects[i].clone(),
            FencingToken::new(1),
            vec![common::put(&objects[i], seqs[i], &format!("k{}", seqs[i] % 3), "v", 1)],
        )
    };
    for n in 0..20 {
        cold.append(next(n % objects.len(), &mut seqs)).await.expect("append");
    }
    let injected = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let pending = Arc::new(parking_lot::Mutex::new(Some(next(0, &mut seqs))));
    let (o2, inj, pend) = (other.clone(), injected.clone(), pending.clone());
    let opts = CompactOptions {
        progress: Some(Arc::new(move |p: &Progress| {
            inj.lock().push(p.clone());
            if matches!(p, Progress::GroupWritten { .. }) {
                if let Some(b) = pend.lock().take() {
                    let o2 = o2.clone();
                    tokio::task::block_in_place(|| {
                        tokio::runtime::Handle::current().block_on(async move { o2.append(b).await.expect("append") })
                    });
                }
            }
        })),
        ..Default::default()
    };
    let report = cold.compact(opts).await.expect("compact");
    assert_eq!(report.attempts, 2, "the injected append forces one rebuild: {report:?}");
    let events = injected.lock().clone();
    assert!(events.iter().any(|e| matches!(e, Progress::Retrying { attempt: 1 })), "{events:?}");
    assert!(matches!(events.last(), Some(Progress::Committed { .. })), "{events:?}");

    // Free-running: appends from another task while compactions run.
    let appender = {
        let other = other.clone();
        let objects = objects.clone();
        let mut seqs = seqs.clone();
        tokio::spawn(async move {
            for n in 0..40 {
                let i = n % objects.len();
                seqs[i] += 1;
                let r = common::put(&objects[i], seqs[i], &format!("k{}", seqs[i] % 3), "v", 1);
                other
                    .append(ColdBatch::single(objects[i].clone(), FencingToken::new(1), vec![r]))
                    .await
                    .expect("append");
            }
            seqs
        })
    };
    let (mut compactions, mut conflicts, mut attempts) = (0, 0, 0);
    while !appender.is_finished() {
        match cold.compact(CompactOptions::default()).await {
            Ok(r) => {
                compactions += usize::from(r.snapshot.is_some());
                attempts += r.attempts;
            }
            Err(e) => {
                assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
                conflicts += 1;
            }
        }
    }
    eprintln!("while appending: {compactions} compactions ({attempts} attempts), {conflicts} gave up");
    assert!(compactions + conflicts > 0, "no compaction ran while the appender was appending");
    let seqs = appender.await.expect("appender");
    // Whatever raced, a compaction after the appender finishes succeeds.
    let last = cold.compact(CompactOptions::default()).await.expect("final compaction");
    eprintln!("{compactions} compactions committed while appending; final: {:?}", last.snapshot);
    for (o, &n) in objects.iter().zip(&seqs) {
        let got: Vec<u64> = cold.read_changes(o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
        assert_eq!(got, (1..=n).collect::<Vec<_>>(), "{o}: every acknowledged record exactly once");
        assert_eq!(cold.watermark(o).await.expect("wm").through, n);
    }
    // Stored once too: dotdo's reads keep one row per sequence number, so a rebuild that left a
    // replaced file live beside its rewrite would pass the reads above.
    assert_eq!(common::live_rows(&cold).await, seqs.iter().sum::<u64>(), "rows stored twice or lost");
}

/// Compaction and collapse need the SQL catalog; with another they fail with a typed error
/// and leave no new data files behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_without_a_sql_catalog_are_invalid_input() {
    let cold = IcebergColdStore::builder("memory://wh")
        .table(["m"], "changes")
        .settings(Settings { buckets: 1, ..Default::default() })
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    for s in 1..=3 {
        cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, s, "k", "v", 1)]))
            .await
            .expect("append");
    }
    let files = live_files(&cold).await;
    let err = cold.compact(CompactOptions::default()).await.expect_err("memory catalog");
    assert_eq!(err.kind(), &ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("SQL catalog"), "{err}");
    assert_eq!(live_files(&cold).await, files);
    let err = cold.collapse(CollapseOptions::new(Timestamp::from_millis(0))).await.expect_err("memory catalog");
    assert_eq!(err.kind(), &ErrorKind::InvalidInput);
    let bad = cold.compact(CompactOptions { target_file_size: 0, ..Default::default() }).await.expect_err("zero");
    assert_eq!(bad.kind(), &ErrorKind::InvalidInput);
}

/// Nanosecond timestamps (Iceberg's `timestamp_ns` / `timestamptz_ns`) exist only from format
/// version 3: a user table (version 2) refuses them, at creation and as an added column, also
/// nested, with `InvalidInput` naming the column; nothing is created. Microseconds are fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_tables_refuse_nanosecond_timestamps_of_format_version_3() {
    use arrow_schema::{DataType, Field, Fields, Schema, TimeUnit};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 2).await;
    let ns = DataType::Timestamp(TimeUnit::Nanosecond, None);
    let ns_tz = DataType::Timestamp(TimeUnit::Nanosecond, Some("+00:00".into()));
    let nested = DataType::Struct(Fields::from(vec![Field::new("at", ns_tz.clone(), true)]));
    for (i, dt) in [ns.clone(), ns_tz, nested].into_iter().enumerate() {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false), Field::new("at", dt, true)]));
        let e = cold.arrow_table(&["m"], &format!("ns{i}"), schema).await.expect_err("a v3 type in a v2 table");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("column at") && e.to_string().contains("version 3"), "{e}");
    }
    let micros = DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into()));
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false), Field::new("at", micros, true)]));
    // Nothing was created: the name is free for a table of another schema.
    let t = cold.arrow_table(&["m"], "ns0", schema).await.expect("microseconds are fine");
    let e = t.add_column("later", ns).await.expect_err("added as a column");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("column later"), "{e}");
}

/// User tables: add an optional column, widen int to long and float to double; rows written
/// before read back null / widened; illegal promotions are rejected; reopening with the new
/// schema works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_table_schema_evolution_reads_old_files() {
    use arrow_array::{Array, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 2).await;
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int32, false),
        Field::new("score", DataType::Float32, true),
    ]));
    let t = cold.arrow_table(&["m"], "events", schema.clone()).await.expect("table");
    let b1 = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(Int32Array::from(vec![1, 2])), Arc::new(Float32Array::from(vec![Some(0.5), None]))],
    )
    .expect("batch");
    t.append("s", 1, vec![b1]).await.expect("append");

    // Not allowed: narrowing, int -> string, unknown column, existing column.
    assert_eq!(t.widen_column("id", DataType::Int32).await.expect_err("same").kind(), &ErrorKind::InvalidInput);
    assert_eq!(t.widen_column("id", DataType::Utf8).await.expect_err("string").kind(), &ErrorKind::InvalidInput);
    assert_eq!(t.widen_column("nope", DataType::Int64).await.expect_err("missing").kind(), &ErrorKind::InvalidInput);
    assert_eq!(t.add_column("id", DataType::Utf8).await.expect_err("exists").kind(), &ErrorKind::InvalidInput);

    let stale = t.clone();
    let t = t.add_column("note", DataType::Utf8).await.expect("add column");
    // A handle opened before a column was added still appends: the new column is null.
    let old_shape = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(Int32Array::from(vec![3])), Arc::new(Float32Array::from(vec![Some(1.0)]))],
    )
    .expect("batch");
    assert_eq!(stale.append("stale", 1, vec![old_shape.clone()]).await.expect("nulls in the new column").rows, 1);
    let before = t.clone();
    let t = t.widen_column("id", DataType::Int64).await.expect("widen id");
    // Widening again from a handle that does not know it happened (a retry after the reply was
    // lost) is done, not "long to long is not an allowed promotion".
    let again = before.widen_column("id", DataType::Int64).await.expect("already widened");
    assert_eq!(again.schema().field(0).data_type(), &DataType::Int64);
    // After a column was widened, batches of the old type are widened too (they were refused,
    // and once reported Corrupt: an Arrow pipeline holding such batches could never roll them).
    let before_widening = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(Int32Array::from(vec![4])), Arc::new(Float32Array::from(vec![Some(2.0)]))],
    )
    .expect("batch");
    assert_eq!(stale.append("stale", 2, vec![before_widening.clone()]).await.expect("widened").rows, 1);
    // A type change that is no widening is still refused.
    let narrowed = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("score", DataType::Float32, true),
    ]));
    let wrong = RecordBatch::try_new(
        narrowed,
        vec![Arc::new(StringArray::from(vec!["x"])), Arc::new(Float32Array::from(vec![Some(2.0)]))],
    )
    .expect("batch");
    let e = t.append("s", 9, vec![wrong]).await.expect_err("a string for a long");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    let t = t.widen_column("score", DataType::Float64).await.expect("widen score");
    // The new handle takes a batch made before both widenings.
    assert_eq!(t.append("old", 1, vec![before_widening]).await.expect("widened twice").rows, 1);
    let new_schema = t.schema();
    assert_eq!(new_schema.field(0).data_type(), &DataType::Int64);
    assert_eq!(new_schema.field(1).data_type(), &DataType::Float64);
    assert_eq!(new_schema.field(2).name(), "note");
    let b2 = RecordBatch::try_new(
        new_schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![5_000_000_000])),
            Arc::new(Float64Array::from(vec![1.25])),
            Arc::new(StringArray::from(vec![Some("new")])),
        ],
    )
    .expect("batch");
    t.append("s", 2, vec![b2]).await.expect("append with the new schema");
    // The old shape is refused now; the new one opens.
    assert_eq!(cold.arrow_table(&["m"], "events", schema).await.expect_err("old").kind(), &ErrorKind::InvalidInput);
    let reopened = cold.arrow_table(&["m"], "events", new_schema).await.expect("reopen");

    let mut rows: Vec<(i64, Option<f64>, Option<String>)> = Vec::new();
    for b in reopened.read_all().await.expect("read") {
        let id = b.column_by_name("id").expect("id").as_any().downcast_ref::<Int64Array>().expect("int64").clone();
        let score =
            b.column_by_name("score").expect("score").as_any().downcast_ref::<Float64Array>().expect("f64").clone();
        let note = b.column_by_name("note").expect("note").as_any().downcast_ref::<StringArray>().expect("str").clone();
        for i in 0..b.num_rows() {
            rows.push((
                id.value(i),
                (!score.is_null(i)).then(|| score.value(i)),
                (!note.is_null(i)).then(|| note.value(i).to_string()),
            ));
        }
    }
    rows.sort_by_key(|r| r.0);
    assert_eq!(
        rows,
        vec![
            (1, Some(0.5), None),
            (2, None, None),
            (3, Some(1.0), None),
            (4, Some(2.0), None),
            (4, Some(2.0), None),
            (5_000_000_000, Some(1.25), Some("new".into()))
        ]
    );
}

/// Orphan cleanup around compaction: a cleanup that runs while a compaction's new files are
/// written but not yet committed keeps them (they are younger than the retention); after the
/// compaction, expiry and a cleanup delete exactly the replaced small files, and every row
/// still reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_cleanup_spares_in_flight_files_and_removes_replaced_ones() {
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let other = open(dir.path(), 1).await;
    let o = ObjectId::new("o").expect("id");
    for s in 1..=6 {
        cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, s, "k", "v", 1)]))
            .await
            .expect("append");
    }
    let deleted_in_flight = Arc::new(parking_lot::Mutex::new(None));
    let (o2, seen) = (other.clone(), deleted_in_flight.clone());
    let opts = CompactOptions {
        progress: Some(Arc::new(move |p: &Progress| {
            if matches!(p, Progress::GroupWritten { .. }) {
                let o2 = o2.clone();
                let report = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current()
                        .block_on(async move { o2.remove_unreferenced_files(Duration::from_secs(3600)).await })
                })
                .expect("cleanup");
                *seen.lock() = Some(report);
            }
        })),
        ..Default::default()
    };
    let report = cold.compact(opts).await.expect("compact");
    let during = deleted_in_flight.lock().take().expect("cleanup ran during the compaction");
    assert!(during.deleted.is_empty(), "{during:?}");
    assert!(during.kept_recent >= 1, "the compaction's uncommitted file is kept: {during:?}");
    assert_eq!((report.files_removed, report.files_added), (6, 1));

    common::sleep(Duration::from_millis(20)).await;
    cold.expire_snapshots(Duration::ZERO, 1).await.expect("expire");
    let clean = cold.remove_unreferenced_files(Duration::ZERO).await.expect("cleanup");
    let parquet_deleted = clean.deleted.iter().filter(|d| d.ends_with(".parquet")).count();
    assert_eq!(parquet_deleted, 6, "the six replaced files: {clean:?}");
    assert_eq!(live_files(&cold).await, 1);
    let seqs: Vec<u64> = cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=6).collect::<Vec<_>>());
}

/// Store `b` commits objects o1, o2 (a watermark checkpoint each commit); store `a` opens
/// (its known table now names that checkpoint; `a` reads through `store` if given); `b` commits
/// o3, o4, expires every older snapshot and cleans up, deleting the checkpoint `a`'s table
/// names. Returns `(a, b)` and the paths the cleanup deleted.
async fn stale_after_checkpoint_cleanup(
    dir: &std::path::Path,
    store: Option<Arc<common::FaultyStore>>,
) -> (IcebergColdStore, IcebergColdStore, Vec<String>) {
    let settings = Settings {
        watermark_checkpoint_objects: 1,
        min_cleanup_retention: std::time::Duration::ZERO,
        ..Default::default()
    };
    let open_one = |store: Option<Arc<common::FaultyStore>>| {
        let mut builder = IcebergColdStore::builder(dir.to_str().expect("utf-8"));
        if let Some(s) = store {
            builder = builder.object_store(s);
        }
        builder.table(["m"], "changes").settings(settings.clone()).build()
    };
    let two = |a: &str, b: &str| {
        let (a, b) = (ObjectId::new(a).expect("id"), ObjectId::new(b).expect("id"));
        ColdBatch {
            objects: [a, b]
                .into_iter()
                .map(|o| ObjectChanges {
                    object: o.clone(),
                    token: FencingToken::new(1),
                    records: vec![common::put(&o, 1, "k", "v", 1)],
                })
                .collect(),
        }
    };
    let b = open_one(None).await.expect("open b");
    b.append(two("o1", "o2")).await.expect("first checkpointed commit");
    let a = open_one(store).await.expect("open a");
    b.append(two("o3", "o4")).await.expect("second checkpointed commit");
    b.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("expire");
    let removed = b.remove_unreferenced_files(std::time::Duration::ZERO).await.expect("cleanup");
    (a, b, removed.deleted)
}

/// A store whose known table is stale appends correctly after another store expired the
/// snapshot its head names and cleaned up that snapshot's watermark checkpoint: the append
/// judges against the current table. Before, it failed with `Corrupt` (the checkpoint file
/// missing) until something else refreshed the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_on_a_stale_table_whose_checkpoint_was_cleaned_up_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, deleted) = stale_after_checkpoint_cleanup(dir.path(), None).await;
    assert!(deleted.iter().any(|f| f.contains("dotdo-watermarks-")), "the first checkpoint is gone: {deleted:?}");
    let o5 = ObjectId::new("o5").expect("id");
    let commit = a
        .append(ColdBatch::single(o5.clone(), FencingToken::new(1), vec![common::put(&o5, 1, "k", "v", 1)]))
        .await
        .expect("append on a stale table");
    assert_eq!(commit.records_written, 1);
    for o in ["o1", "o2", "o3", "o4", "o5"] {
        let o = ObjectId::new(o).expect("id");
        assert_eq!(b.watermark(&o).await.expect("watermark").through, 1, "{o}");
    }
}

/// The same stale store, while the store cannot serve the table's current metadata: the append
/// fails with a retryable error (the outage), not `Corrupt` for the cleaned-up checkpoint of its
/// stale table, which the runtime would take for damage needing an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_append_during_an_outage_is_retryable_not_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faulty = common::FaultyStore::quiet_local();
    let (a, _b, _) = stale_after_checkpoint_cleanup(dir.path(), Some(faulty.clone())).await;
    *faulty.fail_reads_of.lock() = Some(".metadata.json".into());
    let o5 = ObjectId::new("o5").expect("id");
    let batch = ColdBatch::single(o5.clone(), FencingToken::new(1), vec![common::put(&o5, 1, "k", "v", 1)]);
    let e = a.append(batch.clone()).await.expect_err("the current metadata cannot be read");
    assert!(e.is_retryable(), "{e}");
    assert_ne!(e.kind(), &ErrorKind::Corrupt, "{e}");
    *faulty.fail_reads_of.lock() = None;
    assert_eq!(a.append(batch).await.expect("after the outage").records_written, 1);
}

/// A compaction that commits while a cleanup lists the table's files (one that ran longer than
/// the retention, so its new files are older than the cutoff) keeps its files: the cleanup
/// reads the table again before deleting. Before, it deleted the new data, manifests and
/// metadata of the commit it had not seen, and reads failed with `Corrupt`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_committing_during_a_cleanup_keeps_its_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = open(dir.path(), 1).await;
    let o = ObjectId::new("o").expect("id");
    for seq in 1..=4 {
        writer
            .append(ColdBatch::single(
                o.clone(),
                FencingToken::new(1),
                vec![common::put(&o, seq, &format!("k{seq}"), "v", 1)],
            ))
            .await
            .expect("append");
    }
    let hooked = common::FaultyStore::quiet_local();
    // The cleaner's clock runs two hours ahead: every file the compaction writes is older than
    // its cutoff, as the files of a compaction running longer than the retention are.
    use dotdo_core::Clock;
    let ahead = dotdo_core::SystemClock::new().now().as_micros() + 2 * 3_600_000_000;
    let cleaner = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .object_store(hooked.clone())
        .with_clock(Arc::new(dotdo_core::ManualClock::new(Timestamp::from_micros(ahead))))
        .table(["m"], "changes")
        .settings(Settings { buckets: 1, min_cleanup_retention: std::time::Duration::ZERO, ..Default::default() })
        .build()
        .await
        .expect("cleaner");
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    *hooked.before_list.lock() = Some(common::PutHook(
        String::new(),
        Box::pin(async move {
            let _ = started_tx.send(());
            let _ = go_rx.await;
        }),
    ));
    let compact = async {
        started_rx.await.expect("the cleanup lists");
        let report = writer.compact(CompactOptions::default()).await.expect("compact");
        let _ = go_tx.send(());
        report
    };
    let (cleaned, compacted) = tokio::join!(cleaner.remove_unreferenced_files(std::time::Duration::ZERO), compact);
    cleaned.expect("cleanup");
    assert!(compacted.snapshot.is_some(), "{compacted:?}");
    assert!(hooked.before_list.lock().is_none(), "the compaction ran during the listing");
    let state = writer.load_state(&o, AsOf::Latest).await.expect("every file of the head is there");
    assert_eq!(state.through, 4);
    assert_eq!(state.entries.len(), 4);
}

/// A table dropped and created again under the same name with another bucket count, while a
/// store that opened the old one runs: that store prunes reads and partitions its writes by the
/// new table's buckets. Before, it pruned by the old count (rows read as absent) and wrote
/// partition values of the old count under the new spec (rows other stores then skipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_created_again_with_other_buckets_is_read_and_written_by_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = open(dir.path(), 16).await;
    let ident = iceberg::TableIdent::from_strs(["m", "changes"]).expect("ident");
    a.catalog().drop_table(&ident).await.expect("drop");
    let b = open(dir.path(), 4).await;
    let ids: Vec<ObjectId> = (0..12).map(|i| ObjectId::new(format!("obj-{i}")).expect("id")).collect();
    let batch = |ids: &[ObjectId]| common::one_put_each(ids, 1);
    b.append(batch(&ids[..6])).await.expect("b appends to the new table");
    for o in &ids[..6] {
        let st = a.load_state(o, AsOf::Latest).await.expect("a reads the new table");
        assert_eq!(st.entries.len(), 1, "{o} pruned away by the old bucket count");
    }
    a.append(batch(&ids[6..])).await.expect("a appends to the new table");
    for o in &ids[6..] {
        let st = b.load_state(o, AsOf::Latest).await.expect("b reads a's rows");
        assert_eq!(st.entries.len(), 1, "{o} written under the wrong bucket");
    }
}

/// A retry delay that maintenance's backoff would stretch to hours is refused at build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_base_delay_above_one_second_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    use std::time::Duration;
    for (delay, ok) in [(Duration::from_secs(1), true), (Duration::from_secs(3600), false), (Duration::MAX, false)] {
        let r = IcebergColdStore::builder(dir.path().to_str().expect("utf-8 path"))
            .table(["d"], "changes")
            .settings(Settings { retry_base_delay: delay, ..Settings::default() })
            .build()
            .await;
        match r {
            Ok(_) => assert!(ok, "{delay:?} accepted"),
            Err(e) => {
                assert!(!ok, "{delay:?}: {e}");
                assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
            }
        }
    }
}

/// A catalog pointer moved back (an operator restoring an older metadata file) is what
/// `refresh` adopts: the known table, the watermark and the reads follow the catalog, and the
/// next append commits on top of it. (The known table refused an older state, so a handle
/// without `refresh_reads` kept answering the abandoned history's watermark, past what the
/// catalog holds: a runtime would truncate its hot log by it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_follows_a_catalog_pointer_moved_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let builder = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"));
    let (a, o, t1) = three_commits_without_refresh_reads(builder).await;
    let one = FencingToken::new(1);
    let c = rusqlite::Connection::open(dir.path().join("catalog.db")).expect("catalog");
    assert_eq!(
        c.execute("UPDATE iceberg_tables SET metadata_location = ?1 WHERE table_name = 'changes'", [&t1])
            .expect("move the pointer back"),
        1
    );
    drop(c);
    assert_eq!(a.watermark(&o).await.expect("wm").through, 3, "not refreshed yet");
    a.refresh().await.expect("refresh");
    assert_eq!(a.table().metadata_location(), Some(t1.as_str()));
    assert_eq!(a.watermark(&o).await.expect("wm").through, 1, "the catalog's watermark");
    assert_eq!(a.load_state(&o, AsOf::Latest).await.expect("state").entries.len(), 1);
    a.append(ColdBatch::single(o.clone(), one, vec![common::put(&o, 2, "k2", "again", 1)])).await.expect("append");
    assert_eq!(a.watermark(&o).await.expect("wm").through, 2);
}

/// Two reloads at once while an operator moves the catalog pointer back: the one that asked
/// the catalog last wins. A reload that read the pointer before the move and whose metadata
/// read finished last put the abandoned (newer-looking) version back over the other's answer,
/// and the store answered the abandoned history's watermark, past the catalog's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reload_that_asked_last_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooked = common::FaultyStore::quiet_local();
    let builder = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).object_store(hooked.clone());
    let (a, o, t1) = three_commits_without_refresh_reads(builder).await;
    let (a2, db, t1c) = (a.clone(), dir.path().join("catalog.db"), t1.clone());
    // The first reload has read the pointer (version 3) and is about to read its metadata file:
    // the pointer moves back to version 1, and a second reload installs that.
    *hooked.before_get.lock() = Some(common::PutHook(
        ".metadata.json".into(),
        Box::pin(async move {
            let c = rusqlite::Connection::open(db).expect("catalog");
            c.execute("UPDATE iceberg_tables SET metadata_location = ?1 WHERE table_name = 'changes'", [&t1c])
                .expect("move the pointer back");
            drop(c);
            a2.refresh().await.expect("the second reload");
        }),
    ));
    a.refresh().await.expect("the first reload");
    assert!(hooked.before_get.lock().is_none(), "the hook ran");
    assert_eq!(a.table().metadata_location(), Some(t1.as_str()));
    assert_eq!(a.watermark(&o).await.expect("wm").through, 1, "the catalog's watermark");
}

/// A one-bucket store (`builder` with `refresh_reads` off) on table `m.changes`, three commits of
/// object `o` (seqs 1..=3, one each), and the table's metadata location after the first.
async fn three_commits_without_refresh_reads(
    builder: dotdo_iceberg::IcebergColdStoreBuilder,
) -> (IcebergColdStore, ObjectId, String) {
    let a = builder
        .table(["m"], "changes")
        .settings(Settings { buckets: 1, refresh_reads: false, ..Default::default() })
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("valid");
    let mut after_first = None;
    for seq in 1..=3 {
        let put = common::put(&o, seq, &format!("k{seq}"), "v", 1);
        a.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put])).await.expect("append");
        if seq == 1 {
            after_first = a.table().metadata_location().map(str::to_string);
        }
    }
    (a, o, after_first.expect("a metadata location"))
}

/// Settings every append would fail or degrade on are refused at build, `InvalidInput` naming
/// the setting: a zstd level parquet refuses (0, negative, above 22), zero row-group or file
/// sizes, a cleanup minimum above the cap (it is recorded in the table for every store), more
/// commit attempts than the cap (an append against an unreachable store would retry for days).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_every_append_would_fail_on_are_refused_at_build() {
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Settings::default;
    let cases = [
        ("zstd_level", Settings { zstd_level: 0, ..d() }),
        ("zstd_level", Settings { zstd_level: -3, ..d() }),
        ("zstd_level", Settings { zstd_level: 23, ..d() }),
        ("row_group_rows", Settings { row_group_rows: 0, ..d() }),
        ("row_group_bytes", Settings { row_group_bytes: 0, ..d() }),
        ("target_file_size", Settings { target_file_size: 0, ..d() }),
        ("min_cleanup_retention", Settings { min_cleanup_retention: Duration::from_secs(3600 * 24 * 365), ..d() }),
        ("max_commit_attempts", Settings { max_commit_attempts: dotdo_iceberg::MAX_COMMIT_ATTEMPTS + 1, ..d() }),
        ("max_commit_attempts", Settings { max_commit_attempts: u32::MAX, ..d() }),
        // iceberg-rust evaluates bucket[N] modulo N as an i32: 3e9 wrapped to a negative modulus.
        ("buckets", Settings { buckets: 3_000_000_000, ..d() }),
        ("buckets", Settings { buckets: dotdo_iceberg::MAX_BUCKETS + 1, ..d() }),
    ];
    for (name, settings) in cases {
        let e = IcebergColdStore::builder(dir.path().to_str().expect("utf-8 path"))
            .table(["d"], "changes")
            .settings(settings)
            .build()
            .await
            .expect_err(name);
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains(name), "{e}");
    }
    for ok in [
        Settings { zstd_level: 22, ..d() },
        Settings { min_cleanup_retention: dotdo_iceberg::MAX_CLEANUP_RETENTION, ..d() },
        Settings { max_commit_attempts: dotdo_iceberg::MAX_COMMIT_ATTEMPTS, ..d() },
        Settings { buckets: dotdo_iceberg::MAX_BUCKETS, ..d() },
    ] {
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8 path"))
            .table(["d"], "changes")
            .settings(ok)
            .build()
            .await
            .expect("within bounds");
    }
}

/// A stream mark in a user table's summary that is no batch id (not a number, or beyond any
/// count: `mark + 1` would overflow) is `Corrupt`, never taken as "every batch is a replay"
/// (which dropped every later batch) nor ignored; a batch id beyond the limit is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_tables_out_of_range_stream_mark_is_corrupt() {
    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    use iceberg::transaction::{ApplyTransactionAction, Transaction};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 2).await;
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let t = cold.arrow_table(&["m"], "marks", schema.clone()).await.expect("table");
    let batch = || RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![1]))]).expect("batch");
    let e = t.append("s", u64::MAX, vec![batch()]).await.expect_err("id out of range");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    t.append("s", 1, vec![batch()]).await.expect("append");
    for bad in [u64::MAX.to_string(), "seven".to_string()] {
        let ident = iceberg::TableIdent::from_strs(["m", "marks"]).expect("ident");
        let table = cold.catalog().load_table(&ident).await.expect("load");
        let tx = Transaction::new(&table);
        let tx = tx
            .fast_append()
            .set_snapshot_properties([("dotdo.stream.s".to_string(), bad.clone())].into())
            .apply(tx)
            .expect("apply");
        tx.commit(&*cold.catalog()).await.expect("a corrupt mark");
        let e = t.append("s", 2, vec![batch()]).await.expect_err("corrupt mark");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{bad}: {e}");
        assert!(e.to_string().contains("dotdo.stream.s"), "{e}");
        assert_eq!(t.last_batch("s").await.expect_err("corrupt mark").kind(), &ErrorKind::Corrupt);
    }
    // Another stream of the table is not held up by it, and its commits carry the bad mark on
    // as stored (for an operator to repair).
    let before = t.last_batch("other").await.expect("another stream");
    t.append("other", before + 1, vec![batch()]).await.expect("another stream appends");
    assert_eq!(t.last_batch("other").await.expect("mark"), before + 1);
    assert_eq!(t.last_batch("s").await.expect_err("still corrupt").kind(), &ErrorKind::Corrupt);
}

/// A namespace whose location ends in `/` (PyIceberg accepts one) holds dotdo's tables, user
/// tables and change tables, at `<location>/<name>` as PyIceberg places them: the SQL catalog
/// built `…//<name>`, no valid object path, and every create failed `InvalidInput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_location_with_a_trailing_slash_holds_tables() {
    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 2).await;
    let elsewhere = dir.path().join("elsewhere");
    let location =
        format!("{}/", url::Url::from_directory_path(&elsewhere).expect("url").as_str().trim_end_matches('/'));
    let ns = iceberg::NamespaceIdent::new("u".to_string());
    let props = std::collections::HashMap::from([("location".to_string(), location.clone())]);
    cold.catalog().create_namespace(&ns, props).await.expect("namespace");
    let arrow = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]));
    let t = cold.arrow_table(&["u"], "events", arrow.clone()).await.expect("a user table there");
    let batch = RecordBatch::try_new(arrow, vec![Arc::new(Int64Array::from(vec![1, 2]))]).expect("batch");
    t.append("s", 1, vec![batch]).await.expect("append");
    let table = cold.catalog().load_table(&iceberg::TableIdent::new(ns.clone(), "events".into())).await.expect("load");
    assert_eq!(table.metadata().location(), format!("{location}events"), "where PyIceberg puts it");
    let changes = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["u"], "changes")
        .build()
        .await
        .expect("a change table there");
    let o = ObjectId::new("o").expect("valid");
    let rec = common::put(&o, 1, "k", "v", 1);
    changes.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![rec])).await.expect("append");
    assert_eq!(changes.table().metadata().location(), format!("{location}changes"));
    assert!(elsewhere.join("changes").is_dir() && elsewhere.join("events").is_dir());
}

/// A user table another engine created with a partition spec is refused when opened
/// (`InvalidInput` naming the spec): dotdo writes user tables unpartitioned, and an append of
/// unpartitioned files to it panicked in iceberg's manifest writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_user_table_is_refused_not_appended_to() {
    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    use iceberg::spec::{NestedField, PrimitiveType, Transform, Type, UnboundPartitionSpec};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 2).await;
    let ns = iceberg::NamespaceIdent::new("p".to_string());
    cold.catalog().create_namespace(&ns, Default::default()).await.expect("namespace");
    let schema = iceberg::spec::Schema::builder()
        .with_fields(vec![NestedField::optional(1, "n", Type::Primitive(PrimitiveType::Long)).into()])
        .build()
        .expect("schema");
    let spec =
        UnboundPartitionSpec::builder().add_partition_field(1, "n_part", Transform::Identity).expect("field").build();
    let creation =
        iceberg::TableCreation::builder().name("parted".to_string()).schema(schema).partition_spec(spec).build();
    cold.catalog().create_table(&ns, creation).await.expect("another engine's partitioned table");
    let arrow = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]));
    let opened = tokio::spawn({
        let cold = cold.clone();
        async move {
            let t = cold.arrow_table(&["p"], "parted", arrow.clone()).await?;
            let batch = RecordBatch::try_new(arrow, vec![Arc::new(Int64Array::from(vec![1]))]).expect("batch");
            t.append("s", 1, vec![batch]).await.map(|_| ())
        }
    });
    let e = opened.await.expect("no panic").expect_err("a partitioned user table");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("partitioned"), "{e}");
}

/// A user table read whole (`read_all`: iceberg's scan planning reads the manifest list) whose
/// head's manifest list is damaged: `Corrupt` naming the file (iceberg's decoder names none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_manifest_list_of_a_user_table_is_named() {
    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let t = cold.arrow_table(&["m"], "events", schema.clone()).await.expect("table");
    let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2]))]).expect("batch");
    t.append("s", 1, vec![batch]).await.expect("append");
    let table = cold.catalog().load_table(t.ident()).await.expect("load");
    let list = table.metadata().current_snapshot().expect("head").manifest_list().to_string();
    std::fs::write(list.strip_prefix("file://").unwrap_or(&list), b"not avro at all").expect("damage");
    let e = t.read_all().await.expect_err("a damaged manifest list");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains(&list), "names {list}: {e}");
}

/// A user table (ArrowTable) written in many small appends, with a column added half way:
/// compaction keeps every row (old rows read with the new column null), commits `replace`,
/// keeps the stream's batch marks (a replayed batch is skipped), and appends continue; a handle
/// opened before a column was added compacts too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_table_compaction_keeps_rows_and_stream_marks() {
    use arrow_array::{Array, Int64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 2).await;
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let mut t = cold.arrow_table(&["m"], "stream", schema).await.expect("table");
    // A handle opened before the column was added compacts all the same (it read the table
    // through the current schema and relabelled it with its own, and failed).
    let stale = t.clone();
    let batch = |t: &dotdo_iceberg::ArrowTable, id: i64| {
        let s = t.schema();
        let mut cols: Vec<Arc<dyn Array>> = vec![Arc::new(Int64Array::from(vec![id * 10, id * 10 + 1]))];
        if s.fields().len() == 2 {
            cols.push(Arc::new(StringArray::from(vec![Some(format!("b{id}")), None])));
        }
        RecordBatch::try_new(s, cols).expect("batch")
    };
    for id in 1..=8u64 {
        if id == 5 {
            t = t.add_column("tag", DataType::Utf8).await.expect("add column");
        }
        t.append("s", id, vec![batch(&t, id as i64)]).await.expect("append");
    }
    let rows = |batches: Vec<RecordBatch>| {
        let mut out: Vec<(i64, Option<String>)> = Vec::new();
        for b in batches {
            let n = b.column_by_name("n").expect("n").as_any().downcast_ref::<Int64Array>().expect("i64").clone();
            let tag = b.column_by_name("tag").expect("tag").as_any().downcast_ref::<StringArray>().expect("s").clone();
            for i in 0..b.num_rows() {
                out.push((n.value(i), (!tag.is_null(i)).then(|| tag.value(i).to_string())));
            }
        }
        out.sort();
        out
    };
    let before = rows(t.read_all().await.expect("read"));
    assert_eq!(before.len(), 16);
    let report = stale.compact(CompactOptions::default()).await.expect("compact from a handle opened before");
    assert_eq!((report.files_removed, report.files_added), (8, 1), "{report:?}");
    assert_eq!((report.records_read, report.records_written), (16, 16));
    assert_eq!(rows(t.read_all().await.expect("read")), before);
    let table = cold.catalog().load_table(t.ident()).await.expect("load");
    assert_eq!(table.metadata().current_snapshot().expect("head").summary().operation, Operation::Replace);
    assert_eq!(report.snapshot, table.metadata().current_snapshot_id(), "the report names the new head");
    assert_eq!(t.last_batch("s").await.expect("mark"), 8);
    let replay = t.append("s", 3, vec![batch(&t, 3)]).await.expect("replay");
    assert_eq!(replay.rows, 0, "batch 3 was committed before the compaction");
    t.append("s", 9, vec![batch(&t, 9)]).await.expect("append after compaction");
    assert_eq!(rows(t.read_all().await.expect("read")).len(), 18);
    // Batches without rows commit and record nothing: the mark stays, the id is still free.
    let head = cold.catalog().load_table(t.ident()).await.expect("load").metadata().current_snapshot_id();
    for empty in [vec![], vec![batch(&t, 10).slice(0, 0)]] {
        let c = t.append("s", 10, empty).await.expect("no rows");
        assert_eq!((c.snapshot, c.rows), (None, 0));
        assert_eq!(t.last_batch("s").await.expect("mark"), 9, "no mark recorded");
    }
    assert_eq!(cold.catalog().load_table(t.ident()).await.expect("load").metadata().current_snapshot_id(), head);
    let c = t.append("s", 10, vec![batch(&t, 10)]).await.expect("batch 10 with rows");
    assert_eq!(c.rows, 2);
    assert_eq!(t.last_batch("s").await.expect("mark"), 10);
}

/// An input file that another engine's compaction replaced, and its cleanup deleted, while this
/// compaction read it: a retryable `Conflict` (plan again), not `Corrupt` (nothing is damaged;
/// it read as a missing file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_file_replaced_and_deleted_meanwhile_is_a_conflict() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooked = common::FaultyStore::quiet_local();
    let ours = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .object_store(hooked.clone())
        .table(["m"], "changes")
        .settings(Settings { buckets: 1, ..Default::default() })
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    for seq in 1..=3 {
        ours.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, seq, "k", "v", 1)]))
            .await
            .expect("append");
    }
    let inputs: Vec<String> =
        hooked.puts.lock().iter().filter(|p| p.ends_with(".parquet")).map(|p| format!("/{p}")).collect();
    assert_eq!(inputs.len(), 3);
    let path = dir.path().to_path_buf();
    *hooked.before_get.lock() = Some(common::PutHook(
        ".parquet".into(),
        Box::pin(async move {
            // Another process's compaction (a runtime of its own), then its cleanup.
            let other = move || {
                let rt = tokio::runtime::Runtime::new().expect("runtime");
                rt.block_on(async {
                    let other = open(&path, 1).await;
                    other.compact(CompactOptions::default()).await.expect("another engine's compaction");
                });
            };
            tokio::task::spawn_blocking(other).await.expect("the other compaction");
            for f in &inputs {
                std::fs::remove_file(f).expect("and its cleanup");
            }
        }),
    ));
    let e = ours.compact(CompactOptions::default()).await.expect_err("its inputs were replaced");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(e.is_retryable(), "{e}");
    let st = ours.load_state(&o, AsOf::Latest).await.expect("the other compaction's output reads");
    assert_eq!(st.through, 3);
}

/// A user table's compaction writes its output with one rolling writer, in files of the target
/// size: compacting again finds nothing to do. With parallel writers (as an append of this much
/// data uses on two cores or more) each writer ended a file of its own under the small-file
/// threshold, and every compaction rewrote the previous one's output again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_table_compaction_settles() {
    use arrow_array::{Int64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 2).await;
    let schema = Arc::new(Schema::new(vec![
        Field::new("n", DataType::Int64, false),
        Field::new("payload", DataType::Utf8, false),
    ]));
    let t = cold.arrow_table(&["m"], "blobs", schema.clone()).await.expect("table");
    // Four appends of about 10 MiB of Arrow data each (small files once compressed): 40 MiB to
    // compact, more than two parallel writers' worth (16 MiB each).
    for id in 0..4i64 {
        let n: Vec<i64> = (id * 1000..id * 1000 + 1000).collect();
        let payload: Vec<String> = n.iter().map(|i| format!("{i:010}").repeat(1000)).collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(n)), Arc::new(StringArray::from(payload))],
        )
        .expect("batch");
        t.append("s", id as u64 + 1, vec![batch]).await.expect("append");
    }
    let first = t.compact(CompactOptions::default()).await.expect("compact");
    assert_eq!((first.files_removed, first.files_added), (4, 1), "{first:?}");
    let again = t.compact(CompactOptions::default()).await.expect("compact again");
    assert_eq!(again.snapshot, None, "nothing left to compact: {again:?}");
    assert_eq!(t.read_all().await.expect("read").iter().map(RecordBatch::num_rows).sum::<usize>(), 4000);
}

/// A user-table data file another engine added a second time is read twice by every engine's
/// scan: compaction refuses (`InvalidInput`, naming the file) rather than change the table's
/// rows. It was a retryable `Conflict` ("files changed while planning") on every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_table_file_listed_twice_is_not_compacted() {
    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    use iceberg::transaction::{ApplyTransactionAction, Transaction};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 2).await;
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let t = cold.arrow_table(&["m"], "twice", schema.clone()).await.expect("table");
    for id in 1..=2i64 {
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![id]))]).expect("batch");
        t.append("s", id as u64, vec![batch]).await.expect("append");
    }
    let table = cold.catalog().load_table(t.ident()).await.expect("load");
    let head = table.metadata().current_snapshot().expect("head");
    let list = table.manifest_list_reader(head).load().await.expect("list");
    let m = list.entries()[0].load_manifest(table.file_io()).await.expect("manifest");
    let again = m.entries()[0].data_file().clone();
    let path = again.file_path().to_string();
    let tx = Transaction::new(&table);
    let tx = tx.fast_append().add_data_files(vec![again]).with_check_duplicate(false).apply(tx).expect("apply");
    tx.commit(&*cold.catalog()).await.expect("another engine appends a live file again");
    let e = t.compact(CompactOptions::default()).await.expect_err("a file listed twice");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains(&path), "{e}");
}

/// What another engine does to drop column `name` of table `ident` and add a new optional string
/// column under the same name (a new Iceberg field id).
async fn replace_with_a_string_column(cold: &IcebergColdStore, ident: &iceberg::TableIdent, name: &str) {
    use iceberg::spec::{PrimitiveType, Type};
    use iceberg::transaction::{AddColumn, ApplyTransactionAction, Transaction};
    let table = cold.catalog().load_table(ident).await.expect("load");
    let tx = Transaction::new(&table);
    let tx = tx
        .update_schema()
        .delete_column(name)
        .add_column(AddColumn::optional(name, Type::Primitive(PrimitiveType::String)))
        .apply(tx)
        .expect("apply");
    tx.commit(&*cold.catalog()).await.expect("another engine replaces the column");
}

/// A user table's compaction reads its files through the table's current schema, by field id:
/// after another engine dropped column `a` and added a new `a` (so the columns now run `n, b,
/// a`), the old `b` values stay `b` and the new `a` reads null (the scan read through the head
/// snapshot's schema, `n, a, b`, and the rewrite paired its columns with the current schema's by
/// position: the old `a` values were written as `b` and the old `b` values as the new `a`). And a
/// compaction right after `add_column`, with no append since, succeeds (it failed with
/// `Backend`: a batch did not match the table schema).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_table_compaction_reads_through_the_current_schema_by_field_id() {
    use arrow_array::{Array, Int64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let schema = Arc::new(Schema::new(vec![
        Field::new("n", DataType::Int64, false),
        Field::new("a", DataType::Utf8, true),
        Field::new("b", DataType::Utf8, true),
    ]));
    let t = cold.arrow_table(&["m"], "swapped", schema.clone()).await.expect("table");
    for id in 1..=3i64 {
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![id])),
                Arc::new(StringArray::from(vec![format!("a{id}")])),
                Arc::new(StringArray::from(vec![format!("b{id}")])),
            ],
        )
        .expect("batch");
        t.append("s", id as u64, vec![b]).await.expect("append");
    }
    // Another engine drops a and adds a new a.
    replace_with_a_string_column(&cold, t.ident(), "a").await;
    let now = Arc::new(Schema::new(vec![
        Field::new("n", DataType::Int64, false),
        Field::new("b", DataType::Utf8, true),
        Field::new("a", DataType::Utf8, true),
    ]));
    let reopened = cold.arrow_table(&["m"], "swapped", now).await.expect("opened with the current schema");
    let rows = |batches: Vec<RecordBatch>| {
        let mut out: Vec<(i64, Option<String>, Option<String>)> = Vec::new();
        for b in batches {
            let col = |name: &str| {
                b.column_by_name(name).expect("column").as_any().downcast_ref::<StringArray>().expect("utf8").clone()
            };
            let n = b.column_by_name("n").expect("n").as_any().downcast_ref::<Int64Array>().expect("i64").clone();
            let (a, bs) = (col("a"), col("b"));
            let get = |c: &StringArray, i: usize| (!c.is_null(i)).then(|| c.value(i).to_string());
            for i in 0..b.num_rows() {
                out.push((n.value(i), get(&bs, i), get(&a, i)));
            }
        }
        out.sort();
        out
    };
    let want: Vec<(i64, Option<String>, Option<String>)> = (1..=3).map(|i| (i, Some(format!("b{i}")), None)).collect();
    assert_eq!(rows(reopened.read_all().await.expect("read")), want, "read through the current schema");
    let report = reopened.compact(CompactOptions::default()).await.expect("compact");
    assert_eq!((report.files_removed, report.files_added), (3, 1), "{report:?}");
    assert_eq!(rows(reopened.read_all().await.expect("read")), want, "each value under its own column");

    // A column added through this SDK, then a compaction with no append in between.
    let widened = reopened.add_column("note", DataType::Utf8).await.expect("add column");
    let b = RecordBatch::try_new(
        widened.schema(),
        vec![
            Arc::new(Int64Array::from(vec![4])),
            Arc::new(StringArray::from(vec!["b4"])),
            Arc::new(StringArray::from(vec![None::<&str>])),
            Arc::new(StringArray::from(vec!["n4"])),
        ],
    )
    .expect("batch");
    widened.append("s", 4, vec![b]).await.expect("append");
    let later = widened.add_column("more", DataType::Utf8).await.expect("add another column");
    later.compact(CompactOptions::default()).await.expect("compact right after add_column");
    let all = later.read_all().await.expect("read");
    assert_eq!(all.iter().map(RecordBatch::num_rows).sum::<usize>(), 4);
    assert!(all.iter().all(|b| b.schema().fields().len() == 5 && b.column_by_name("more").is_some()));
}

/// A handle opened before another engine dropped a column and added another of the same name
/// (a new Iceberg field id) refuses a new batch (`InvalidInput`), as for a dropped column: its
/// values were written into the new column, matched by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_handle_does_not_write_into_a_column_added_again_under_the_same_name() {
    use arrow_array::{Int64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let schema = Arc::new(Schema::new(vec![
        Field::new("n", DataType::Int64, false),
        Field::new("status", DataType::Utf8, true),
    ]));
    let t = cold.arrow_table(&["m"], "renamed", schema.clone()).await.expect("table");
    let batch = |n: i64| {
        RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![n])), Arc::new(StringArray::from(vec!["old meaning"]))],
        )
        .expect("batch")
    };
    t.append("s", 1, vec![batch(1)]).await.expect("batch 1");
    // Another engine replaces the column.
    replace_with_a_string_column(&cold, t.ident(), "status").await;
    let e = t.append("s", 2, vec![batch(2)]).await.expect_err("the column is another one now");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert_eq!(t.last_batch("s").await.expect("mark"), 1, "nothing committed");
    // A handle opened on the table as it is now writes to the new column.
    let reopened = cold.arrow_table(&["m"], "renamed", schema.clone()).await.expect("reopened");
    assert_eq!(reopened.append("s", 2, vec![batch(2)]).await.expect("append").rows, 1);
}

/// A column added from a handle that does not know of another column added since (by another
/// handle) is added, and the returned handle appends (nulls in the other column): it was
/// `InvalidInput` ("the table's schema is now …") for a change that landed, on every retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_from_a_stale_handle_is_added() {
    use arrow_array::{Array, Int64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let a = cold.arrow_table(&["m"], "two_adds", schema.clone()).await.expect("table");
    let b = a.clone();
    let a = a.add_column("x", DataType::Utf8).await.expect("a adds x");
    let b = b.add_column("y", DataType::Utf8).await.expect("b adds y beside x");
    let with_y = RecordBatch::try_new(
        b.schema().clone(),
        vec![Arc::new(Int64Array::from(vec![1])), Arc::new(StringArray::from(vec!["why"]))],
    )
    .expect("batch");
    assert_eq!(b.append("s", 1, vec![with_y]).await.expect("append through b").rows, 1);
    let rows = b.read_all().await.expect("read");
    let batch = &rows[0];
    let names: Vec<&str> = batch.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["n", "x", "y"]);
    assert!(batch.column(1).is_null(0), "x is null");
    let y = batch.column(2).as_any().downcast_ref::<StringArray>().expect("y");
    assert_eq!(y.value(0), "why");
    // Another engine drops `x` and adds a new `x`: a handle that knew the old one is not handed
    // the new one by adding a column (its batches' `x` values would land in it).
    replace_with_a_string_column(&cold, a.ident(), "x").await;
    let e = a.add_column("z", DataType::Utf8).await.expect_err("x is another column now");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    // The same on a table of the handle's very shape (no column another writer added).
    let c = cold.arrow_table(&["m"], "one_add", schema.clone()).await.expect("table");
    let c = c.add_column("x", DataType::Utf8).await.expect("c adds x");
    replace_with_a_string_column(&cold, c.ident(), "x").await;
    let e = c.add_column("z", DataType::Utf8).await.expect_err("x is another column now");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
}

/// The same for a field nested in a struct column: another engine drops `s.b` and adds a new
/// `s.b` (the struct's shape is as before, its field id another). A handle opened before refuses
/// the append (`InvalidInput`): it wrote the old `b` values into the new field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_handle_does_not_write_into_a_nested_field_added_again_under_the_same_name() {
    use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray, StructArray};
    use arrow_schema::{DataType, Field, Fields, Schema};
    use iceberg::spec::{PrimitiveType, Type};
    use iceberg::transaction::{AddColumn, ApplyTransactionAction, Transaction};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let fields = Fields::from(vec![Field::new("a", DataType::Int64, true), Field::new("b", DataType::Utf8, true)]);
    let schema = Arc::new(Schema::new(vec![
        Field::new("n", DataType::Int64, false),
        Field::new("s", DataType::Struct(fields.clone()), true),
    ]));
    let t = cold.arrow_table(&["m"], "nested", schema.clone()).await.expect("table");
    let batch = |n: i64| {
        let s = StructArray::new(
            fields.clone(),
            vec![Arc::new(Int64Array::from(vec![n])) as ArrayRef, Arc::new(StringArray::from(vec!["old meaning"]))],
            None,
        );
        RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![n])), Arc::new(s)]).expect("batch")
    };
    t.append("s", 1, vec![batch(1)]).await.expect("batch 1");
    // Another engine replaces the nested field.
    for step in 0..2 {
        let table = cold.catalog().load_table(t.ident()).await.expect("load");
        let tx = Transaction::new(&table);
        let update = tx.update_schema();
        let update = if step == 0 {
            update.delete_column("s.b")
        } else {
            update.add_column(
                AddColumn::builder().parent("s").name("b").field_type(Type::Primitive(PrimitiveType::String)).build(),
            )
        };
        let tx = update.apply(tx).expect("apply");
        tx.commit(&*cold.catalog()).await.expect("another engine replaces the nested field");
    }
    let e = t.append("s", 2, vec![batch(2)]).await.expect_err("the nested field is another one now");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert_eq!(t.last_batch("s").await.expect("mark"), 1, "nothing committed");
    let reopened = cold.arrow_table(&["m"], "nested", schema.clone()).await.expect("reopened");
    assert_eq!(reopened.append("s", 2, vec![batch(2)]).await.expect("append").rows, 1);
}

/// A user schema with a struct of no fields (at any depth) is refused before the table is
/// created: Parquet cannot write it, so every append failed (as `Corrupt`, naming no damage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_with_an_empty_struct_is_refused_before_the_table_is_created() {
    use arrow_schema::{DataType, Field, Fields, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let empty = DataType::Struct(Fields::empty());
    for (name, meta) in [
        ("top", empty.clone()),
        ("in_list", DataType::List(Arc::new(Field::new("item", empty.clone(), true)))),
        ("nested", DataType::Struct(Fields::from(vec![Field::new("inner", empty.clone(), true)]))),
    ] {
        let schema =
            Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false), Field::new("meta", meta, true)]));
        let e = cold.arrow_table(&["m"], name, schema).await.expect_err("no Parquet form");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{name}: {e}");
        let ident = iceberg::TableIdent::from_strs(["m", name]).expect("ident");
        assert!(!cold.catalog().table_exists(&ident).await.expect("exists"), "{name}: not created");
    }
}

/// A user table's file bounds cover every value, also a long string in a later row group:
/// parquet truncates long statistics and marks them inexact, and iceberg-rust left such a row
/// group out of the bounds, so a filtered scan (here iceberg-rust's own) pruned the file and
/// lost the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_table_bounds_cover_long_values_in_later_row_groups() {
    use arrow_array::{RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use iceberg::expr::Reference;
    use iceberg::spec::Datum;
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, false)]));
    let t = cold.arrow_table(&["m"], "events", schema.clone()).await.expect("table");
    let (high, low) = ("z".repeat(100), "a".repeat(100));
    // parquet's default row group holds 1,048,576 rows: the long values land in the second.
    let mut v: Vec<&str> = vec!["m"; 1 << 20];
    v.push(&high);
    v.push(&low);
    let b = RecordBatch::try_new(t.schema(), vec![Arc::new(StringArray::from(v))]).expect("batch");
    t.append("s", 1, vec![b]).await.expect("append");
    let table = cold.catalog().load_table(t.ident()).await.expect("load");
    for probe in [&high, &low] {
        let rows = filtered_rows(&table, Reference::new("s").equal_to(Datum::string(probe))).await;
        assert_eq!(rows, 1, "the file was pruned by bounds that leave out {probe:?}");
    }
}

/// Rows of `table` an iceberg-rust scan with `filter` returns (after its pruning by bounds).
async fn filtered_rows(table: &iceberg::table::Table, filter: iceberg::expr::Predicate) -> usize {
    use futures::TryStreamExt;
    let scan = table.scan().with_filter(filter).build().expect("scan");
    let batches: Vec<_> = scan.to_arrow().await.expect("arrow").try_collect().await.expect("rows");
    batches.iter().map(|b| b.num_rows()).sum()
}

/// A user-table column holding a value over 256 bytes in a write gets no statistics: kept whole,
/// every large value was stored three times per row group (data, footer min, footer max) and
/// twice more in its manifest entry (files of 4 MiB blobs came out ~3x their data; a value over
/// 100 MB made a footer pyarrow refuses). Short columns keep exact bounds that still prune.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_table_long_values_get_no_statistics() {
    use arrow_array::{Int64Array, LargeBinaryArray, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use iceberg::expr::Reference;
    use iceberg::spec::Datum;
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let schema = Arc::new(Schema::new(vec![
        Field::new("n", DataType::Int64, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("note", DataType::Utf8, false),
        Field::new("payload", DataType::LargeBinary, false),
    ]));
    let t = cold.arrow_table(&["m"], "blobs", schema.clone()).await.expect("table");
    const BLOB: usize = 4 << 20;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let blobs: Vec<Vec<u8>> = (0..4)
        .map(|_| {
            (0..BLOB)
                .map(|_| {
                    // xorshift: incompressible bytes, as images or documents are.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        })
        .collect();
    let long_note = "n".repeat(1000);
    let notes: Vec<&str> = vec!["short", long_note.as_str(), "short", "short"];
    let b = RecordBatch::try_new(
        t.schema(),
        vec![
            Arc::new(Int64Array::from(vec![0, 1, 2, 3])),
            Arc::new(StringArray::from(vec!["row-0", "row-1", "row-2", "row-3"])),
            Arc::new(StringArray::from(notes)),
            Arc::new(LargeBinaryArray::from(blobs.iter().map(|b| b.as_slice()).collect::<Vec<_>>())),
        ],
    )
    .expect("batch");
    t.append("s", 1, vec![b]).await.expect("append");
    let table = cold.catalog().load_table(t.ident()).await.expect("load");
    let id = |name: &str| table.metadata().current_schema().field_by_name(name).expect("field").id;
    let head = table.metadata().current_snapshot().expect("head");
    let list = table.manifest_list_reader(head).load().await.expect("manifest list");
    let (mut bytes, mut files) = (0u64, 0);
    for mf in list.entries() {
        for e in mf.load_manifest(table.file_io()).await.expect("manifest").entries() {
            let f = e.data_file();
            bytes += f.file_size_in_bytes();
            files += 1;
            for (name, bounded) in [("n", true), ("name", true), ("note", false), ("payload", false)] {
                assert_eq!(f.lower_bounds().contains_key(&id(name)), bounded, "{name}: lower bound");
                assert_eq!(f.upper_bounds().contains_key(&id(name)), bounded, "{name}: upper bound");
            }
        }
    }
    assert!(files > 0);
    let data = (4 * BLOB) as u64;
    assert!(bytes < data + data / 2, "{bytes} bytes of files for {data} bytes of values");
    // Every row is found through filters on both kinds of column (no bounds: no pruning).
    for (column, probe) in [("name", "row-2"), ("note", long_note.as_str()), ("n", "")] {
        let filter = match column {
            "n" => Reference::new("n").equal_to(Datum::long(3)),
            c => Reference::new(c).equal_to(Datum::string(probe)),
        };
        assert_eq!(filtered_rows(&table, filter).await, 1, "{column} = {probe:?}");
    }
}

/// Cleanup of a table touches only its own `data/` and `metadata/` files: a table the catalog
/// placed under its location (`m.changes.nested` lives at `<warehouse>/m/changes/nested`) keeps
/// every file and stays readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_leaves_a_table_nested_under_the_location_alone() {
    use arrow_array::{Array, Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let o = ObjectId::new("o").expect("id");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 1, "k", "v", 1)]))
        .await
        .expect("append");
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let outer = cold.refresh().await.expect("refresh").metadata().location().to_string();
    // Tables named `data` and `metadata` live right in this table's own directories.
    let mut nested_tables = Vec::new();
    for name in ["nested", "data", "metadata"] {
        let nested = cold.arrow_table(&["m", "changes"], name, schema.clone()).await.expect("nested table");
        let inner = cold.catalog().load_table(nested.ident()).await.expect("load").metadata().location().to_string();
        assert_eq!(inner, format!("{outer}/{name}"));
        for id in 1..=3u64 {
            let b = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from(vec![id as i64])) as Arc<dyn Array>],
            )
            .expect("batch");
            nested.append("s", id, vec![b]).await.expect("append nested");
        }
        nested_tables.push(nested);
    }
    // A file of the outer table's own that nothing references: the cleanup does remove it. A
    // version hint (written by a Hadoop-style writer, read by engines that find a table by its
    // path) is referenced by no metadata, and kept.
    let outer_dir = outer.strip_prefix("file://").unwrap_or(&outer);
    std::fs::write(format!("{outer_dir}/data/orphan-of-the-outer-table.parquet"), b"orphan").expect("orphan");
    std::fs::write(format!("{outer_dir}/metadata/version-hint.text"), b"1").expect("version hint");
    common::sleep(std::time::Duration::from_millis(20)).await;
    let clean = cold.remove_unreferenced_files(std::time::Duration::ZERO).await.expect("cleanup");
    let orphan = format!("{outer}/data/orphan-of-the-outer-table.parquet");
    assert!(clean.deleted.contains(&orphan), "the outer table's orphan, {orphan}: {clean:?}");
    assert!(
        std::path::Path::new(&format!("{outer_dir}/metadata/version-hint.text")).exists(),
        "the version hint is kept: {clean:?}"
    );
    for name in ["nested", "data", "metadata"] {
        for sub in ["data", "metadata"] {
            let theirs = format!("{outer}/{name}/{sub}/");
            assert!(clean.deleted.iter().all(|d| !d.starts_with(&theirs)), "{theirs}: {clean:?}");
        }
    }
    for nested in &nested_tables {
        let rows: usize = nested.read_all().await.expect("nested still readable").iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 3);
    }
    assert_eq!(cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").len(), 1);
}

/// Files a compaction replaced stay on disk for the retention period after the compaction
/// (a reader may still scan the snapshot before it), even when the files themselves are older
/// and the pre-compaction snapshots are expired; after that they are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_files_get_the_retention_period_from_the_compaction() {
    use dotdo_core::{Clock, ManualClock, SystemClock};
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(SystemClock::new().now());
    // The clock moves ahead of the files' times, so every new file looks hours old: a zero
    // minimum retention (no writer runs alongside a cleanup here) lets the compactions commit
    // them (see `a_compaction_whose_files_a_cleanup_could_take_does_not_commit`).
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["m"], "changes")
        .settings(Settings { buckets: 1, min_cleanup_retention: Duration::ZERO, ..Default::default() })
        .with_clock(Arc::new(clock.clone()))
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    for s in 1..=4 {
        cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, s, "k", "v", 1)]))
            .await
            .expect("append");
    }
    let hour = Duration::from_secs(3600);
    clock.advance(hour * 2);
    cold.compact(CompactOptions::default()).await.expect("compact");
    cold.expire_snapshots(Duration::ZERO, 1).await.expect("expire");
    // The four data files are two (clock) hours old, the compaction is new: kept.
    let kept = cold.remove_unreferenced_files(hour).await.expect("cleanup");
    assert_eq!(kept.deleted.iter().filter(|d| d.ends_with(".parquet")).count(), 0, "{kept:?}");
    clock.advance(hour * 2);
    let clean = cold.remove_unreferenced_files(hour).await.expect("cleanup");
    assert_eq!(clean.deleted.iter().filter(|d| d.ends_with(".parquet")).count(), 4, "{clean:?}");
    let seqs: Vec<u64> = cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);

    // Also when the compaction's own snapshot is expired too (an append after it, then expiry
    // keeping one snapshot): the removal is no older than the append that followed it.
    for s in 5..=8 {
        cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, s, "k", "v", 1)]))
            .await
            .expect("append");
    }
    clock.advance(hour * 2);
    cold.compact(CompactOptions::default()).await.expect("second compaction");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 9, "k", "v", 1)]))
        .await
        .expect("append after the compaction");
    clock.advance(Duration::from_millis(1));
    cold.expire_snapshots(Duration::ZERO, 1).await.expect("expire the compaction's snapshot too");
    let t = cold.refresh().await.expect("table");
    assert_eq!(t.metadata().snapshots().count(), 1, "only the append after the compaction is left");
    let kept = cold.remove_unreferenced_files(hour).await.expect("cleanup");
    assert_eq!(kept.deleted.iter().filter(|d| d.ends_with(".parquet")).count(), 0, "{kept:?}");
    clock.advance(hour * 2);
    let clean = cold.remove_unreferenced_files(hour).await.expect("cleanup");
    assert_eq!(clean.deleted.iter().filter(|d| d.ends_with(".parquet")).count(), 5, "{clean:?}");
    let seqs: Vec<u64> = cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=9).collect::<Vec<_>>());
}

/// Files a compaction replaced stay for the retention after it also when a later compaction
/// followed and every snapshot but the head is expired: a reader of a table version from before
/// may still need them, and their own write times are old. (They were deleted at once.) Kept by
/// the cleanup's walk of the metadata log (the version before the first compaction was current
/// moments ago), and, where that version has left the log (more than 100 commits since), by the
/// later compaction keeping the manifest that lists only the first one's removals while they are
/// recent. Three shapes: one bucket, whole-table compactions; the same with 101 appends between
/// them; two buckets, one compacted at a time (the later compaction rewrites the manifest that
/// records the first one's removals beside live entries, and drops that record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_compaction_keeps_the_record_of_recent_removals() {
    recent_removals_survive_a_later_compaction(1, None, None, 1, [3, 2, 5]).await;
    recent_removals_survive_a_later_compaction(1, None, None, 101, [3, 102, 105]).await;
    recent_removals_survive_a_later_compaction(2, Some(0), Some(1), 1, [3, 4, 7]).await;
}

/// A table version the cleanup's walk of the metadata log reads (current moments ago) whose head
/// names its manifest list at a location this store does not map (another spelling of it, or
/// another engine's bucket): the cleanup fails, deleting nothing, rather than skip that head as
/// gone and judge the files it names unreferenced (a read of such a location is `Corrupt`, as a
/// missing file's is, since iceberg's own reader names it so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logged_version_whose_head_lies_outside_the_store_fails_the_cleanup() {
    use dotdo_core::{Clock, ManualClock, SystemClock};
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(SystemClock::new().now());
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["m"], "changes")
        .settings(Settings { buckets: 1, ..Default::default() })
        .with_clock(Arc::new(clock.clone()))
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    for seq in 1..=3 {
        cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, seq, "k", "v", 1)]))
            .await
            .expect("append");
    }
    let before = cold.refresh().await.expect("table");
    let old_head = before.metadata().current_snapshot().expect("head").snapshot_id();
    cold.compact(CompactOptions::default()).await.expect("compaction");
    clock.advance(std::time::Duration::from_millis(1));
    cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("expire all but the head");
    let table = cold.refresh().await.expect("table");
    let mut edited = 0;
    for logged in table.metadata().metadata_log() {
        common::edit_metadata(&logged.metadata_file, |m| {
            for snap in m["snapshots"].as_array_mut().into_iter().flatten() {
                if snap["snapshot-id"].as_i64() == Some(old_head) {
                    snap["manifest-list"] = serde_json::json!("s3://elsewhere/wh/m/changes/metadata/snap-x.avro");
                    edited += 1;
                }
            }
        });
    }
    assert!(edited > 0, "no logged version holds the old head");
    let files = common::files_ending_with(dir.path(), ".parquet").len();
    let e = cold.remove_unreferenced_files(std::time::Duration::from_secs(3600)).await.expect_err("a head elsewhere");
    assert!(e.to_string().contains("s3://elsewhere"), "{e}");
    assert_eq!(common::files_ending_with(dir.path(), ".parquet").len(), files, "nothing deleted");
}

/// Three appends, the data files made to look two hours old, compaction `first`, `between`
/// appends, compaction `second`, expiry of all but the head, cleanups within and past the
/// window. `counts`: files the two compactions remove, files the last cleanup deletes.
#[allow(clippy::disallowed_methods)] // file times set into the past
async fn recent_removals_survive_a_later_compaction(
    buckets: u32,
    first: Option<i32>,
    second: Option<i32>,
    between: u64,
    counts: [u64; 3],
) {
    use dotdo_core::{Clock, ManualClock, SystemClock};
    use std::time::{Duration, SystemTime};
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(SystemClock::new().now());
    let open = |refresh_reads| {
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .table(["m"], "changes")
            // The default cleanup minimum (1 hour) is the window the record is kept for.
            .settings(Settings { buckets, refresh_reads, ..Default::default() })
            .with_clock(Arc::new(clock.clone()))
            .build()
    };
    let cold = open(true).await.expect("open");
    let objects: Vec<ObjectId> = (0..8).map(|i| ObjectId::new(format!("obj-{i}")).expect("id")).collect();
    let batch = |seq: u64| common::one_put_each(&objects, seq);
    for seq in 1..=3 {
        cold.append(batch(seq)).await.expect("append");
    }
    let hour = Duration::from_secs(3600);
    let originals = common::files_ending_with(dir.path(), ".parquet");
    assert_eq!(originals.len(), 3 * buckets as usize, "three appends into every bucket");
    for f in &originals {
        let file = std::fs::File::options().write(true).open(f).expect("open data file");
        file.set_modified(SystemTime::now() - hour * 2).expect("set the file's time");
    }
    let stale = open(false).await.expect("a reader that stays on the snapshot before the compactions");
    let only =
        |p: Option<i32>| CompactOptions { partitions: p.map(|p| [p].into_iter().collect()), ..Default::default() };
    assert_eq!(cold.compact(only(first)).await.expect("first compaction").files_removed, counts[0]);
    for seq in 4..4 + between {
        cold.append(batch(seq)).await.expect("append");
    }
    assert_eq!(cold.compact(only(second)).await.expect("second compaction").files_removed, counts[1]);
    clock.advance(Duration::from_millis(1));
    cold.expire_snapshots(Duration::ZERO, 1).await.expect("expire all but the head");
    assert_eq!(cold.refresh().await.expect("table").metadata().snapshots().count(), 1);
    let kept = cold.remove_unreferenced_files(hour).await.expect("cleanup");
    assert_eq!(kept.deleted.iter().filter(|d| d.ends_with(".parquet")).count(), 0, "{buckets} buckets: {kept:?}");
    for o in &objects {
        let seqs: Vec<u64> =
            stale.read_changes(o, 0, AsOf::Latest).await.expect("stale read").iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3], "{o}");
    }
    // Past the window every replaced file goes (the originals among them).
    clock.advance(hour * 2);
    let clean = cold.remove_unreferenced_files(hour).await.expect("cleanup");
    let deleted: Vec<&String> = clean.deleted.iter().filter(|d| d.ends_with(".parquet")).collect();
    assert_eq!(deleted.len() as u64, counts[2], "{buckets} buckets: {clean:?}");
    for f in &originals {
        // The partition directory and the name (one append names its files alike in each).
        let tail: Vec<&str> = f.iter().rev().take(2).map(|p| p.to_str().expect("utf-8")).collect();
        let tail = format!("/{}/{}", tail[1], tail[0]);
        assert!(deleted.iter().any(|d| d.ends_with(&tail)), "{tail} not deleted: {deleted:?}");
    }
    for o in &objects {
        let seqs: Vec<u64> = cold.read_changes(o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..4 + between).collect::<Vec<_>>(), "{o}");
    }
}

/// A cleanup retention below `Settings::min_cleanup_retention` (default 1 hour) is refused before
/// anything is listed or deleted: it could remove the files of a commit still in flight.
#[tokio::test]
async fn a_cleanup_retention_below_the_minimum_is_invalid_input() {
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["m"], "changes")
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 1, "k", "v", 1)]))
        .await
        .expect("append");
    for short in [Duration::ZERO, Duration::from_secs(60), Duration::from_secs(3599)] {
        let e = cold.remove_unreferenced_files(short).await.expect_err("too short");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{short:?}: {e}");
    }
    let report = cold.remove_unreferenced_files(Duration::from_secs(3600)).await.expect("the minimum is accepted");
    assert!(report.deleted.is_empty(), "{report:?}");
    let st = cold.load_state(&o, dotdo_core::AsOf::Latest).await.expect("state");
    assert_eq!(st.entries.len(), 1);
}

/// Time travel to a moment whose snapshots were all expired is `NotFound`, not an empty object
/// (an empty state with `through = 0` would let a restore reuse sequence numbers).
#[tokio::test]
async fn time_travel_into_expired_history_is_not_found() {
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let o = ObjectId::new("o").expect("id");
    for s in 1..=3 {
        cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, s, "k", "v", 1)]))
            .await
            .expect("append");
        common::sleep(Duration::from_millis(5)).await;
    }
    let snaps = cold.snapshots().await.expect("snapshots");
    let second = snaps[1].committed_at;
    let st = cold.load_state(&o, dotdo_core::AsOf::Timestamp(second)).await.expect("as of the second");
    assert_eq!(st.through, 2);
    let before_all = dotdo_core::Timestamp::from_micros(snaps[0].committed_at.as_micros() - 1);
    let st = cold.load_state(&o, dotdo_core::AsOf::Timestamp(before_all)).await.expect("before any snapshot");
    assert!(st.entries.is_empty() && st.through == 0, "genuinely before the table's history");
    cold.expire_snapshots(Duration::ZERO, 1).await.expect("expire");
    let e = cold.load_state(&o, dotdo_core::AsOf::Timestamp(second)).await.expect_err("expired history");
    assert_eq!(e.kind(), &ErrorKind::NotFound, "{e}");
    let st = cold.load_state(&o, dotdo_core::AsOf::Latest).await.expect("latest");
    assert_eq!(st.through, 3);
}

/// Another engine's commit on top of the table's head: an append of no files with a snapshot
/// property, and none of dotdo's summary properties (as a PyIceberg or Spark commit has).
async fn foreign_commit(cold: &IcebergColdStore) {
    foreign_commit_with(cold, "engine").await
}

/// [`foreign_commit`] with the snapshot property `key` (e.g. one under `dotdo.`).
async fn foreign_commit_with(cold: &IcebergColdStore, key: &str) {
    use iceberg::transaction::{ApplyTransactionAction, Transaction};
    let table = cold.refresh().await.expect("table");
    let tx = Transaction::new(&table);
    let tx = tx
        .fast_append()
        .set_snapshot_properties([(key.to_string(), "another".to_string())].into())
        .apply(tx)
        .expect("apply");
    tx.commit(&*cold.catalog()).await.expect("another engine's commit");
}

/// Inline watermarks are bounded in bytes too: 400 objects with 256-byte ids (within the default
/// 1,000 objects) go to a checkpoint file instead of putting ~120 KB into the summary, which
/// every later metadata file would carry; they read back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_object_ids_go_to_a_checkpoint_not_the_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 4).await;
    let objects: Vec<ObjectId> =
        (0..400).map(|i| ObjectId::new(format!("{i:03}{}", "x".repeat(253))).expect("id")).collect();
    cold.append(common::one_put_each(&objects, 1)).await.expect("append");
    let head = cold.refresh().await.expect("table").metadata().current_snapshot().cloned().expect("head");
    let props = &head.summary().additional_properties;
    let inline = props.get("dotdo.watermarks").map_or(0, String::len);
    assert!(inline <= dotdo_iceberg::summary::INLINE_WATERMARK_BYTES, "{inline} bytes inline");
    assert!(props.contains_key("dotdo.watermarks-checkpoint"), "a checkpoint holds them");
    let fresh = open(dir.path(), 4).await;
    for o in [&objects[0], &objects[399]] {
        assert_eq!(fresh.watermark(o).await.expect("watermark").through, 1);
    }
}

/// Inline watermarks are not repeated in snapshot after snapshot: one commit of 900 objects
/// (within the default 1,000, ~45 KB inline), then 60 commits of one object each. Every later
/// snapshot's summary carried the 900 watermarks (until a checkpoint that never came), and the
/// table metadata, which holds every snapshot's summary and is rewritten on each commit, grew by
/// ~45 KB per commit. Once the repeated part outweighs a checkpoint, a checkpoint is written;
/// every watermark still reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_watermarks_are_not_carried_from_snapshot_to_snapshot_without_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 4).await;
    let objects: Vec<ObjectId> =
        (0..900).map(|i| ObjectId::new(format!("tenant-0042/object-{i:06}")).expect("id")).collect();
    cold.append(common::one_put_each(&objects, 1)).await.expect("append");
    let busy = ObjectId::new("busy").expect("id");
    for seq in 1..=60 {
        cold.append(ColdBatch::single(busy.clone(), FencingToken::new(1), vec![common::put(&busy, seq, "k", "v", 1)]))
            .await
            .expect("append");
    }
    let table = cold.refresh().await.expect("table");
    let inline: usize = table
        .metadata()
        .snapshots()
        .map(|s| s.summary().additional_properties.get("dotdo.watermarks").map_or(0, String::len))
        .sum();
    assert!(inline < 200_000, "{inline} bytes of inline watermarks across 61 snapshots");
    let head = table.metadata().current_snapshot().expect("head");
    assert!(head.summary().additional_properties.contains_key("dotdo.watermarks-checkpoint"), "a checkpoint");
    let fresh = open(dir.path(), 4).await;
    for o in [&objects[0], &objects[450], &objects[899]] {
        assert_eq!(fresh.watermark(o).await.expect("watermark").through, 1);
    }
    assert_eq!(fresh.watermark(&busy).await.expect("watermark").through, 60);
}

/// A compaction's snapshot repeats its parent's inline watermarks and counts them as carried,
/// as an append does: it copied the count unchanged, so a compaction after every roll repeated
/// up to 64 KiB of watermarks per snapshot that the bound on carried watermarks never saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_counts_the_inline_watermarks_it_carries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let objects: Vec<ObjectId> =
        (0..300).map(|i| ObjectId::new(format!("tenant-0042/object-{i:06}")).expect("id")).collect();
    cold.append(common::one_put_each(&objects, 1)).await.expect("append");
    let busy = ObjectId::new("busy").expect("id");
    for seq in 1..=2 {
        cold.append(ColdBatch::single(busy.clone(), FencingToken::new(1), vec![common::put(&busy, seq, "k", "v", 1)]))
            .await
            .expect("append");
    }
    let carried = |s: &iceberg::spec::Snapshot| -> u64 {
        s.summary().additional_properties.get("dotdo.watermarks-carried").map_or(0, |v| v.parse().expect("count"))
    };
    let table = cold.refresh().await.expect("table");
    let parent = table.metadata().current_snapshot().expect("head").clone();
    let inline = dotdo_iceberg::summary::decode_watermarks(
        parent.summary().additional_properties.get("dotdo.watermarks").expect("inline").as_bytes(),
        "parent",
    )
    .expect("decode");
    assert_eq!(inline.len(), 301, "every watermark inline");
    let inline_bytes: u64 = inline.keys().map(|id| id.as_str().len() as u64 + 46).sum();
    let report = cold
        .compact(dotdo_iceberg::CompactOptions { min_input_files: 2, ..Default::default() })
        .await
        .expect("compact");
    assert!(report.snapshot.is_some(), "compacted");
    let table = cold.refresh().await.expect("table");
    let head = table.metadata().current_snapshot().expect("head");
    assert_eq!(head.parent_snapshot_id(), Some(parent.snapshot_id()));
    assert_eq!(carried(head), carried(&parent) + inline_bytes, "the compaction's repeated watermarks are counted");
}

/// Another engine's compaction on top of dotdo's last commit, then its snapshot expiry removing
/// that commit (Spark's `rewrite_data_files`, then `expire_snapshots(retain_last => 1)`): the
/// watermarks still read (from the table property dotdo's commits set), a replay is skipped, a
/// stale token is fenced, and dotdo's cleanup keeps the checkpoint only that property names.
/// Every append and watermark read was `Corrupt`, with no repair path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_engines_expiry_of_dotdos_last_snapshot_keeps_the_watermarks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open_store = || {
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .table(["m"], "changes")
            .settings(Settings {
                watermark_checkpoint_objects: 0,
                min_cleanup_retention: std::time::Duration::ZERO,
                ..Default::default()
            })
            .build()
    };
    let cold = open_store().await.expect("open");
    let o = ObjectId::new("o").expect("id");
    let first = ColdBatch::single(
        o.clone(),
        FencingToken::new(2),
        vec![common::put(&o, 1, "k", "v1", 2), common::put(&o, 2, "k", "v2", 2)],
    );
    cold.append(first.clone()).await.expect("dotdo's commit");
    let dotdos = cold.refresh().await.expect("table").metadata().current_snapshot_id().expect("head");
    foreign_commit(&cold).await;
    // The other engine's expiry: dotdo's snapshot is gone.
    let head = expire_all_but_the_head(&cold).await;
    assert_ne!(dotdos, head);

    let fresh = open_store().await.expect("reopen");
    assert_eq!(fresh.watermark(&o).await.expect("watermark").through, 2);
    fresh.remove_unreferenced_files(std::time::Duration::ZERO).await.expect("cleanup");
    let fresh = open_store().await.expect("reopen after the cleanup");
    let w = fresh.watermark(&o).await.expect("watermark after the cleanup");
    assert_eq!((w.through, w.token), (2, FencingToken::new(2)));
    assert_eq!(fresh.append(first).await.expect("a replay").records_written, 0, "skipped");
    let stale = ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 3, "k", "v3", 1)]);
    let e = fresh.append(stale).await.expect_err("a stale token");
    assert!(matches!(e.kind(), ErrorKind::Fenced { .. }), "{e}");
    let next = ColdBatch::single(o.clone(), FencingToken::new(2), vec![common::put(&o, 3, "k", "v3", 2)]);
    assert_eq!(fresh.append(next).await.expect("appends go on").records_written, 1);
    let seqs: Vec<u64> = fresh.read_changes(&o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
}

/// Another engine's expiry of every snapshot but the head of `cold`'s table (its metadata file
/// edited in place); the head's id.
async fn expire_all_but_the_head(cold: &IcebergColdStore) -> i64 {
    let table = cold.refresh().await.expect("table");
    let head = table.metadata().current_snapshot_id().expect("head");
    common::edit_metadata(table.metadata_location().expect("metadata"), |json| {
        let keep = |s: &serde_json::Value| s["snapshot-id"].as_i64() == Some(head);
        json["snapshots"].as_array_mut().expect("snapshots").retain(keep);
        json["snapshot-log"].as_array_mut().expect("log").retain(keep);
    });
    head
}

/// Append a put of `o` at `seq` (key `k`, token 1) and return the snapshot it made.
async fn put_at(cold: &IcebergColdStore, o: &ObjectId, seq: u64) -> i64 {
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(o, seq, "k", "v", 1)]))
        .await
        .expect("dotdo's commit");
    cold.refresh().await.expect("table").metadata().current_snapshot_id().expect("head")
}

/// The table property of dotdo's last commit is not taken for a head it is no ancestor of:
/// `main` rolled back to dotdo's first commit, another engine's snapshot on top of it, then an
/// expiry of both dotdo snapshots reads as `Corrupt`, not with the rolled-back commit's
/// watermarks (which would skip as replays what the rollback removed); and so does a head with
/// more than one expired snapshot below it (whether the property's commit is among them is not
/// known).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_commit_property_is_not_read_for_a_head_rolled_back_past_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 4).await;
    let o = ObjectId::new("o").expect("id");
    let first = put_at(&cold, &o, 1).await;
    let second = put_at(&cold, &o, 2).await;
    // Another engine rolls `main` back to the first commit and commits on top of it.
    let table = cold.refresh().await.expect("table");
    common::edit_metadata(table.metadata_location().expect("metadata"), |json| {
        json["current-snapshot-id"] = first.into();
        json["refs"]["main"]["snapshot-id"] = first.into();
    });
    let reopened = open(dir.path(), 4).await;
    foreign_commit(&reopened).await;
    // Then its expiry removes both dotdo snapshots.
    let table = reopened.refresh().await.expect("table");
    common::edit_metadata(table.metadata_location().expect("metadata"), |json| {
        let gone = |s: &serde_json::Value| [Some(first), Some(second)].contains(&s["snapshot-id"].as_i64());
        json["snapshots"].as_array_mut().expect("snapshots").retain(|s| !gone(s));
        json["snapshot-log"].as_array_mut().expect("log").retain(|s| !gone(s));
    });
    let fresh = open(dir.path(), 4).await;
    let e = fresh.watermark(&o).await.expect_err("unknown watermarks");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");

    // Dotdo's commit with two foreign ones above it, all but the head expired.
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 4).await;
    put_at(&cold, &o, 1).await;
    foreign_commit(&cold).await;
    foreign_commit(&cold).await;
    expire_all_but_the_head(&cold).await;
    let e = open(dir.path(), 4).await.watermark(&o).await.expect_err("unknown watermarks");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
}

/// A format-v1 user table `u.events` (one `id` column) made as another engine would, its
/// handle, and a batch of two rows for it.
async fn v1_user_table(cold: &IcebergColdStore) -> (dotdo_iceberg::ArrowTable, arrow_array::RecordBatch) {
    common::create_v1_events_table(cold).await;
    let arrow =
        Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new("id", arrow_schema::DataType::Int32, false)]));
    let user = cold.arrow_table(&["u"], "events", arrow.clone()).await.expect("user table");
    let rows = arrow_array::RecordBatch::try_new(arrow, vec![Arc::new(arrow_array::Int32Array::from(vec![1, 2]))])
        .expect("batch");
    (user, rows)
}

/// A format-v1 user table whose history another engine started anew after dotdo's commits (a
/// root snapshot with no dotdo marks, dotdo's snapshot off its chain) reads as `Corrupt`: every
/// snapshot of a v1 table has sequence number 0, and the stream marks read as "nothing
/// committed" (batch 1 would have been written again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the other engine's snapshot is stamped later
async fn a_replaced_history_on_a_v1_table_is_corrupt() {
    use iceberg::transaction::{ApplyTransactionAction, Transaction};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 4).await;
    let (user, rows) = v1_user_table(&cold).await;
    user.append("s", 1, vec![rows.clone()]).await.expect("dotdo's append");
    // Another engine's snapshot, made the root of a new history.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let t = cold.catalog().load_table(user.ident()).await.expect("load");
    let tx = Transaction::new(&t);
    let tx = tx.fast_append().set_snapshot_properties([("engine".to_string(), "x".to_string())].into()).apply(tx);
    tx.expect("apply").commit(&*cold.catalog()).await.expect("another engine's commit");
    let t = cold.catalog().load_table(user.ident()).await.expect("load");
    let head = t.metadata().current_snapshot_id().expect("head");
    common::edit_metadata(t.metadata_location().expect("metadata"), |json| {
        for s in json["snapshots"].as_array_mut().expect("snapshots") {
            if s["snapshot-id"].as_i64() == Some(head) {
                s.as_object_mut().expect("snapshot").remove("parent-snapshot-id");
            }
        }
    });
    let fresh = open(dir.path(), 4).await;
    let user = fresh.arrow_table(&["u"], "events", user.schema().clone()).await.expect("user table");
    let e = user.last_batch("s").await.expect_err("the marks are unknown");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
}

/// A format-v1 user table with a tag another engine set (Spark and PyIceberg write refs into v1
/// metadata too) is refused for appends, schema changes and expiry (`InvalidInput`):
/// iceberg-rust 0.10 reads v1 metadata without its refs and writes every new version without
/// them, so an append dropped the tag and an expiry then expired the snapshot it kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_table_with_another_engines_tag_is_not_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 4).await;
    let (user, rows) = v1_user_table(&cold).await;
    for id in 1..=3 {
        user.append("s", id, vec![rows.clone()]).await.expect("dotdo's append");
    }
    let t = cold.catalog().load_table(user.ident()).await.expect("load");
    let root = t.metadata().snapshots().find(|s| s.parent_snapshot_id().is_none());
    let first = root.map(|s| s.snapshot_id()).expect("the first snapshot");
    let location = t.metadata_location().expect("metadata").to_string();
    common::edit_metadata(&location, |json| {
        let refs = json.as_object_mut().expect("metadata").entry("refs").or_insert_with(|| serde_json::json!({}));
        refs["audit"] = serde_json::json!({"snapshot-id": first, "type": "tag"});
    });
    let fresh = open(dir.path(), 4).await;
    let user = fresh.arrow_table(&["u"], "events", user.schema().clone()).await.expect("user table");
    let e = user.append("s", 4, vec![rows.clone()]).await.expect_err("an append would drop the tag");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("audit"), "{e}");
    let e = user.expire_snapshots(std::time::Duration::ZERO, 1).await.expect_err("expiry would expire the tagged one");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    let e = user.add_column("extra", arrow_schema::DataType::Int64).await.expect_err("a schema change too");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    let t = fresh.catalog().load_table(user.ident()).await.expect("load");
    assert_eq!(t.metadata_location(), Some(location.as_str()), "nothing committed");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(location.trim_start_matches("file://")).expect("read")).expect("json");
    assert_eq!(json["refs"]["audit"]["snapshot-id"].as_i64(), Some(first), "the tag is kept");
    assert_eq!(t.metadata().snapshots().count(), 3, "every snapshot is kept");
}

/// A history another engine started anew after dotdo's commits, once dotdo's old snapshots are
/// expired too, still reads as `Corrupt` (the table property of dotdo's last commit says dotdo
/// wrote this table): the watermarks read as "nothing committed" (replays written twice, stale
/// committers let through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_history_whose_old_snapshots_are_expired_is_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 4).await;
    let o = ObjectId::new("o").expect("id");
    let dotdos = put_at(&cold, &o, 1).await;
    let at = cold.snapshots().await.expect("snapshots").iter().find(|s| s.id == dotdos).expect("dotdo's").committed_at;
    foreign_commit(&cold).await;
    let table = cold.refresh().await.expect("table");
    let head = table.metadata().current_snapshot_id().expect("head");
    // The new history's root (no parent), and dotdo's old snapshot expired.
    common::edit_metadata(table.metadata_location().expect("metadata"), |json| {
        json["snapshots"].as_array_mut().expect("snapshots").retain(|s| s["snapshot-id"].as_i64() != Some(dotdos));
        json["snapshot-log"].as_array_mut().expect("log").retain(|s| s["snapshot-id"].as_i64() != Some(dotdos));
        for s in json["snapshots"].as_array_mut().expect("snapshots") {
            if s["snapshot-id"].as_i64() == Some(head) {
                s.as_object_mut().expect("snapshot").remove("parent-snapshot-id");
            }
        }
    });
    let reopened = open(dir.path(), 4).await;
    let e = reopened.watermark(&o).await.expect_err("unknown watermarks");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    // Time travel to dotdo's commit: that state is dotdo's old history, not nothing (it read
    // as an empty object, which a restore as of that time would have taken).
    let e = reopened.load_state(&o, AsOf::Timestamp(at)).await.expect_err("the old history is gone");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
}

/// On a table another engine wrote before dotdo's first commit, time travel to that engine's
/// first snapshot reads no dotdo state (it is no replaced history: dotdo's commits came later),
/// while the table property of dotdo's last commit exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_travel_before_dotdos_first_commit_reads_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 4).await;
    foreign_commit(&cold).await;
    let foreign = cold.refresh().await.expect("table").metadata().current_snapshot_id().expect("head");
    let o = ObjectId::new("o").expect("id");
    put_at(&cold, &o, 1).await;
    let state = cold.load_state(&o, AsOf::Snapshot(foreign)).await.expect("the state before dotdo's commits");
    assert_eq!(state.through, 0);
    assert_eq!(cold.watermark(&o).await.expect("watermark").through, 1);
}

/// A snapshot another engine commits on top of dotdo's (no `dotdo.*` properties, as a Spark
/// compaction or a PyIceberg append writes them) keeps dotdo's watermarks: replays are still
/// skipped, a stale committer is still fenced, appends continue; and dotdo's next commit carries
/// them on. Before, such a head read as "no watermarks" (every token 0, every object at seq 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_engines_snapshot_keeps_dotdos_watermarks() {
    // Also one with a property under `dotdo.` of its own (a note, a hand-written key): it was
    // taken for dotdo's, and its missing watermarks for "nothing committed".
    for key in ["engine", "dotdo.note"] {
        another_engines_snapshot_keeps_dotdos_watermarks_with(key).await;
    }
}

async fn another_engines_snapshot_keeps_dotdos_watermarks_with(key: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 4).await;
    let o = ObjectId::new("o").expect("id");
    let first = ColdBatch::single(
        o.clone(),
        FencingToken::new(2),
        vec![common::put(&o, 1, "k", "v1", 2), common::put(&o, 2, "k", "v2", 2)],
    );
    cold.append(first.clone()).await.expect("dotdo's commit");
    let foreign = || foreign_commit_with(&cold, key);
    foreign().await;
    let head = cold.refresh().await.expect("table").metadata().current_snapshot().cloned().expect("head");
    assert!(!head.summary().additional_properties.contains_key("dotdo.watermarks"), "a foreign head");
    assert_eq!(cold.watermark(&o).await.expect("watermark").through, 2);
    let replay = cold.append(first).await.expect("replay");
    assert_eq!((replay.records_written, replay.records_skipped), (0, 2));
    let stale = ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 3, "k", "stale", 1)]);
    let e = cold.append(stale).await.expect_err("a stale committer");
    assert!(e.is_fenced(), "{e}");
    let next = ColdBatch::single(o.clone(), FencingToken::new(2), vec![common::put(&o, 3, "k", "v3", 2)]);
    assert_eq!(cold.append(next).await.expect("continues").records_written, 1);
    foreign().await;
    let seqs: Vec<u64> = cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(cold.watermark(&o).await.expect("watermark").through, 3);
    // Expiry keeping only the (foreign) head keeps the dotdo snapshot its watermarks live in.
    common::sleep(std::time::Duration::from_millis(5)).await;
    cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("expire");
    assert_eq!(cold.watermark(&o).await.expect("watermark after expiry").through, 3);
    let next = ColdBatch::single(o.clone(), FencingToken::new(2), vec![common::put(&o, 4, "k", "v4", 2)]);
    assert_eq!(cold.append(next).await.expect("appends continue after expiry").records_written, 1);
}

/// A one-bucket store on a new table at `dir` with one put of object `o` (seq 1, key `k`)
/// committed, and the table after it.
async fn one_put_committed(dir: &std::path::Path) -> (IcebergColdStore, ObjectId, iceberg::table::Table) {
    let cold = open(dir, 1).await;
    let o = ObjectId::new("o").expect("id");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 1, "k", "v", 1)]))
        .await
        .expect("append");
    let table = cold.refresh().await.expect("table");
    (cold, o, table)
}

/// Another engine's append of the data file at `location` (one record, in `format`, of `size`
/// bytes, partition 0) to `table`, without column statistics.
async fn add_foreign_file(
    cold: &IcebergColdStore,
    table: &iceberg::table::Table,
    location: String,
    format: iceberg::spec::DataFileFormat,
    size: u64,
) {
    use iceberg::spec::{DataContentType, DataFileBuilder, Struct};
    use iceberg::transaction::{ApplyTransactionAction, Transaction};
    let file = DataFileBuilder::default()
        .content(DataContentType::Data)
        .file_path(location)
        .file_format(format)
        .partition_spec_id(table.metadata().default_partition_spec_id())
        .partition(Struct::from_iter([Some(iceberg::spec::Literal::int(0))]))
        .record_count(1)
        .file_size_in_bytes(size)
        .build()
        .expect("data file");
    let tx = Transaction::new(table);
    let tx = tx.fast_append().add_data_files(vec![file]).apply(tx).expect("apply");
    tx.commit(&*cold.catalog()).await.expect("another engine's append");
}

/// A Parquet data file another writer added whose embedded Arrow schema makes `do_id` and `op`
/// dictionary columns (pyarrow's categoricals, added with PyIceberg's `add_files`) reads as the
/// strings it holds, in lookups, change reads and compaction (it was `Corrupt`: "column do_id is
/// Dictionary(Int32, Utf8) not a string").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_file_with_dictionary_columns_reads_as_its_strings() {
    use arrow_array::{ArrayRef, Int64Array, LargeBinaryArray, RecordBatch, StringArray, TimestampMicrosecondArray};
    use arrow_schema::{DataType, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, o, table) = one_put_committed(dir.path()).await;
    let plain = iceberg::arrow::schema_to_arrow_schema(table.metadata().current_schema()).expect("arrow schema");
    let dictionary = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    let fields: Vec<arrow_schema::Field> = plain
        .fields()
        .iter()
        .map(|f| match f.name().as_str() {
            "do_id" | "op" => f.as_ref().clone().with_data_type(dictionary.clone()),
            _ => f.as_ref().clone(),
        })
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let dict =
        |v: &str| -> ArrayRef { arrow_cast::cast(&StringArray::from(vec![v]), &dictionary).expect("dictionary array") };
    let columns: Vec<ArrayRef> = vec![
        dict("o"),
        Arc::new(StringArray::from(vec!["T"])),
        Arc::new(StringArray::from(vec!["k2"])),
        Arc::new(LargeBinaryArray::from(vec![b"w".as_slice()])),
        Arc::new(TimestampMicrosecondArray::from(vec![1_000_000]).with_timezone("+00:00")),
        dict("put"),
        Arc::new(Int64Array::from(vec![2])),
        Arc::new(Int64Array::from(vec![1])),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).expect("batch");
    let location = format!("{}/data/foreign-dictionary.parquet", table.metadata().location());
    let path = location.strip_prefix("file://").expect("a local table").to_string();
    let mut writer = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).expect("create"), schema, None)
        .expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
    let size = std::fs::metadata(&path).expect("size").len();
    add_foreign_file(&cold, &table, location, iceberg::spec::DataFileFormat::Parquet, size).await;
    let found = cold.lookup(&o, "k2", AsOf::Latest).await.expect("lookup");
    assert_eq!(found.value.map(|e| e.value), Some(bytes::Bytes::from("w")));
    let seqs = |records: Vec<dotdo_core::ChangeRecord>| records.iter().map(|r| r.seq).collect::<Vec<u64>>();
    assert_eq!(seqs(cold.read_changes(&o, 0, AsOf::Latest).await.expect("read")), [1, 2]);
    let report = cold.compact(CompactOptions::default()).await.expect("compaction");
    assert_eq!((report.records_read, report.records_written), (2, 2), "{report:?}");
    assert_eq!(seqs(cold.read_changes(&o, 0, AsOf::Latest).await.expect("read")), [1, 2]);
}

/// A data file in a format dotdo cannot decode (another engine's ORC file) fails a read that
/// must open it as `Backend` naming the file and its format, not `Corrupt`: nothing is damaged.
/// Compaction leaves such a file alone and compacts the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_file_in_another_format_is_not_reported_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, o, table) = one_put_committed(dir.path()).await;
    let orc = format!("{}/data/foreign-00000.orc", table.metadata().location());
    add_foreign_file(&cold, &table, orc.clone(), iceberg::spec::DataFileFormat::Orc, 100).await;
    let e = cold.lookup(&o, "k", AsOf::Latest).await.expect_err("an ORC file to read");
    assert_eq!(e.kind(), &ErrorKind::Backend, "{e}");
    assert!(e.to_string().contains("foreign-00000.orc") && e.to_string().contains("Parquet"), "{e}");
    let e = cold.load_state(&o, AsOf::Latest).await.expect_err("an ORC file to read");
    assert_eq!(e.kind(), &ErrorKind::Backend, "{e}");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 2, "k", "w", 1)]))
        .await
        .expect("append");
    assert_eq!(live_files(&cold).await, 3);
    let report = cold.compact(CompactOptions::default()).await.expect("compaction around the ORC file");
    assert_eq!(live_files(&cold).await, 2, "two Parquet files became one, the ORC file stays: {report:?}");
    // A collapse of its partition could drop a delete that supersedes the ORC file's rows (every
    // other engine's fold would show them again): refused, naming it.
    let horizon = dotdo_core::Clock::now(&dotdo_core::SystemClock::new());
    let e =
        cold.collapse(dotdo_iceberg::CollapseOptions::new(horizon)).await.expect_err("an ORC file in the partition");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("foreign-00000.orc"), "{e}");
    assert_eq!(live_files(&cold).await, 2, "nothing committed");
}

/// A data file another engine added from outside the warehouse (another bucket or scheme) fails
/// a read that must open it, and a compaction of its partition, as `Corrupt` naming it (it was
/// `InvalidInput`, blaming the caller's request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_file_outside_the_warehouse_is_corrupt_not_invalid_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, o, table) = one_put_committed(dir.path()).await;
    let elsewhere = "ftp://elsewhere/data/foreign-00000.parquet".to_string();
    add_foreign_file(&cold, &table, elsewhere, iceberg::spec::DataFileFormat::Parquet, 100).await;
    let e = cold.read_changes(&o, 0, AsOf::Latest).await.expect_err("a file out of reach");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("ftp://elsewhere/data/foreign-00000.parquet"), "{e}");
    let e = cold.load_state(&o, AsOf::Latest).await.expect_err("a file out of reach");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 2, "k", "w", 1)]))
        .await
        .expect("append");
    let e = cold.compact(CompactOptions::default()).await.expect_err("a file out of reach in the partition");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
}

/// The same for a user table, whose reads and compaction go through iceberg's own reader: a data
/// file another engine added from outside the warehouse is `Corrupt` naming it (it was
/// `InvalidInput`: "configuration", the storage's answer to a location it cannot map).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_table_data_file_outside_the_warehouse_is_corrupt_not_invalid_input() {
    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    use iceberg::spec::{DataContentType, DataFileBuilder, Struct};
    use iceberg::transaction::{ApplyTransactionAction, Transaction};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let t = cold.arrow_table(&["u"], "foreign", schema.clone()).await.expect("table");
    let b = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1]))]).expect("batch");
    t.append("s", 1, vec![b]).await.expect("append");
    let table = cold.catalog().load_table(t.ident()).await.expect("load");
    let elsewhere = "ftp://elsewhere/data/foreign-00000.parquet";
    let file = DataFileBuilder::default()
        .content(DataContentType::Data)
        .file_path(elsewhere.to_string())
        .file_format(iceberg::spec::DataFileFormat::Parquet)
        .partition_spec_id(table.metadata().default_partition_spec_id())
        .partition(Struct::empty())
        .record_count(1)
        .file_size_in_bytes(100)
        .build()
        .expect("data file");
    let tx = Transaction::new(&table);
    let tx = tx.fast_append().add_data_files(vec![file]).apply(tx).expect("apply");
    tx.commit(&*cold.catalog()).await.expect("another engine's append");
    let e = t.read_all().await.expect_err("a file out of reach");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains(elsewhere), "{e}");
    let e = t.compact(CompactOptions::default()).await.expect_err("a file out of reach");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains(elsewhere), "{e}");
}

/// Two catalog names on one warehouse, each with table `m.changes`: the second table gets a
/// location of its own (the SQL catalog put both at `<warehouse>/m/changes`, and each cleanup
/// deleted the other's files as unreferenced), and a cleanup of a table that shares its
/// location anyway (made by an older version, or another engine) is refused, deleting nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_of_two_catalog_names_never_share_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open_as = |catalog: &str| {
        let settings = Settings {
            buckets: 1,
            catalog_name: catalog.to_string(),
            min_cleanup_retention: std::time::Duration::ZERO,
            ..Default::default()
        };
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .table(["m"], "changes")
            .settings(settings)
            .build()
    };
    let (a, b) = (open_as("a").await.expect("open a"), open_as("b").await.expect("open b"));
    let o = ObjectId::new("o").expect("id");
    for (store, seq) in [(&a, 1), (&b, 1), (&b, 2)] {
        let batch = ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, seq, "k", "v", 1)]);
        store.append(batch).await.expect("append");
    }
    let (la, lb) = (
        a.refresh().await.expect("a").metadata().location().to_string(),
        b.refresh().await.expect("b").metadata().location().to_string(),
    );
    assert_ne!(la, lb);
    assert!(lb.ends_with("/m/changes-b"), "{lb}");
    common::sleep(std::time::Duration::from_millis(10)).await;
    a.remove_unreferenced_files(std::time::Duration::ZERO).await.expect("cleanup of a");
    b.remove_unreferenced_files(std::time::Duration::ZERO).await.expect("cleanup of b");
    let b = open_as("b").await.expect("b reopens");
    assert_eq!(b.read_changes(&o, 0, AsOf::Latest).await.expect("b's rows").len(), 2);
    assert_eq!(a.read_changes(&o, 0, AsOf::Latest).await.expect("a's rows").len(), 1);

    // A third catalog's row pointing into a's directory, as a table of an older version would.
    let a_meta = a.refresh().await.expect("a").metadata_location().expect("location").to_string();
    let c = rusqlite::Connection::open(dir.path().join("catalog.db")).expect("catalog db");
    c.execute(
        "INSERT INTO iceberg_tables (catalog_name, table_namespace, table_name, metadata_location, \
         previous_metadata_location, iceberg_type) VALUES ('old', 'm', 'Changes', ?1, NULL, 'TABLE')",
        [&a_meta],
    )
    .expect("row");
    let files_before = live_files(&a).await;
    let e = a.remove_unreferenced_files(std::time::Duration::ZERO).await.expect_err("shared location");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("m.Changes") && e.to_string().contains("\"old\""), "{e}");
    assert_eq!(live_files(&a).await, files_before);
    // The same place spelled as a Java engine writes it (`file:/path`, no `//`): still refused.
    c.execute("DELETE FROM iceberg_tables WHERE catalog_name = 'old'", []).expect("delete row");
    let path = a_meta.trim_start_matches("file://");
    c.execute(
        "INSERT INTO iceberg_tables (catalog_name, table_namespace, table_name, metadata_location, \
         previous_metadata_location, iceberg_type) VALUES ('spark', 'm', 'changes', ?1, NULL, 'TABLE')",
        [format!("file:{path}")],
    )
    .expect("row");
    let e = a.remove_unreferenced_files(std::time::Duration::ZERO).await.expect_err("shared location");
    assert!(e.to_string().contains("\"spark\""), "{e}");
    c.execute("DELETE FROM iceberg_tables WHERE catalog_name = 'spark'", []).expect("delete row");

    // A user table of catalog b named like a's change table goes elsewhere too.
    let schema =
        Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new("n", arrow_schema::DataType::Int64, false)]));
    let (c1, c2) = (open_as("c1").await.expect("open c1"), open_as("c2").await.expect("open c2"));
    let user = c2.arrow_table(&["m"], "changes-c1", schema).await.expect("user table");
    let user_location = c2.catalog().load_table(user.ident()).await.expect("load").metadata().location().to_string();
    let c1_location = c1.refresh().await.expect("c1").metadata().location().to_string();
    assert_ne!(user_location, c1_location);
    c1.remove_unreferenced_files(std::time::Duration::ZERO).await.expect("cleanup of c1");
}

/// Two different change records of one object with one seq (another writer's file appended
/// into the table) make a collapse `Corrupt` with nothing committed, as reads are: it kept one
/// of them, in no particular order, erasing the evidence and perhaps the acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collapse_over_two_records_with_one_seq_is_corrupt_and_commits_nothing() {
    use iceberg::transaction::{ApplyTransactionAction, Transaction};
    let (dir, other_dir) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let (cold, other) = (open(dir.path(), 1).await, open(other_dir.path(), 1).await);
    let o = ObjectId::new("o").expect("id");
    let one = |value: &str| ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 1, "k", value, 1)]);
    cold.append(one("v")).await.expect("append");
    other.append(one("w")).await.expect("another table's seq 1");
    let theirs = other.refresh().await.expect("table");
    let list = theirs.manifest_list_reader(theirs.metadata().current_snapshot().expect("head")).load().await;
    let m = list.expect("list").entries()[0].load_manifest(theirs.file_io()).await.expect("manifest");
    let file = m.entries()[0].data_file().clone();
    let table = cold.refresh().await.expect("table");
    let tx = Transaction::new(&table);
    let tx = tx.fast_append().add_data_files(vec![file]).apply(tx).expect("apply");
    tx.commit(&*cold.catalog()).await.expect("another engine appends the file");
    let snapshots = cold.refresh().await.expect("table").metadata().snapshots().count();
    let horizon = Timestamp::from_millis(i64::MAX / 1000);
    let e = cold.collapse(dotdo_iceberg::CollapseOptions::new(horizon)).await.expect_err("two records with seq 1");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("seq 1"), "{e}");
    assert_eq!(cold.refresh().await.expect("table").metadata().snapshots().count(), snapshots, "nothing committed");
    assert_eq!(live_files(&cold).await, 2);
}

/// A file another engine appended a second time (live twice in the table) is compacted once:
/// before, it counted twice among the files to replace and every compaction of its partition
/// failed with a false "no longer in the table" conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_listed_twice_is_compacted_once() {
    use iceberg::transaction::{ApplyTransactionAction, Transaction};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let o = ObjectId::new("o").expect("id");
    for seq in 1..=2 {
        cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, seq, "k", "v", 1)]))
            .await
            .expect("append");
    }
    let table = cold.refresh().await.expect("table");
    let head = table.metadata().current_snapshot().expect("head");
    let list = table.manifest_list_reader(head).load().await.expect("list");
    let m = list.entries()[0].load_manifest(table.file_io()).await.expect("manifest");
    let again = m.entries()[0].data_file().clone();
    let tx = Transaction::new(&table);
    let tx = tx.fast_append().add_data_files(vec![again]).with_check_duplicate(false).apply(tx).expect("apply");
    tx.commit(&*cold.catalog()).await.expect("another engine appends a live file again");
    assert_eq!(live_files(&cold).await, 3);
    // Reads take it for one file: opened once, counted once.
    let found = dotdo_core::IndexAccelerator::lookup(&cold, &o, "k", AsOf::Latest).await.expect("lookup");
    assert_eq!(found.stats.files_total, 2, "{:?}", found.stats);
    assert!(found.stats.files_opened <= 2, "{:?}", found.stats);
    let report = cold.compact(CompactOptions::default()).await.expect("compaction");
    // Three entries deleted (one file listed twice), the rows of two files rewritten once.
    assert_eq!((report.files_removed, report.files_added), (3, 1), "{report:?}");
    assert_eq!((report.records_read, report.records_written), (2, 2), "{report:?}");
    assert_eq!(live_files(&cold).await, 1);
    // The snapshot's totals count what is live: one file, two rows.
    let table = cold.refresh().await.expect("table");
    let summary = &table.metadata().current_snapshot().expect("head").summary().additional_properties;
    assert_eq!(summary.get("total-data-files").map(String::as_str), Some("1"), "{summary:?}");
    assert_eq!(summary.get("total-records").map(String::as_str), Some("2"), "{summary:?}");
    let seqs: Vec<u64> = cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2]);
}

/// The table is dropped and created again under the same name while a compaction rewrites its
/// files: the compaction refuses (`Conflict`) instead of committing the old table's rows into
/// the new one (whose empty head listed none of the files to replace). Retryable: a run again
/// plans from the files live then (it was "no retry can succeed", while a re-run did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_of_a_table_replaced_meanwhile_commits_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let o = ObjectId::new("o").expect("id");
    for seq in 1..=3 {
        cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, seq, "k", "v", 1)]))
            .await
            .expect("append");
    }
    let ident = cold.refresh().await.expect("table").identifier().clone();
    let (catalog, path) = (cold.catalog(), dir.path().to_path_buf());
    let opts = CompactOptions {
        progress: Some(Arc::new(move |p: &Progress| {
            if matches!(p, Progress::GroupWritten { .. }) {
                let (catalog, ident, path) = (catalog.clone(), ident.clone(), path.clone());
                tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(async move {
                        catalog.drop_table(&ident).await.expect("drop");
                        open(&path, 1).await;
                    })
                });
            }
        })),
        ..Default::default()
    };
    let e = cold.compact(opts).await.expect_err("the table was replaced");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(e.is_retryable() && e.to_string().contains("replaced"), "{e}");
    cold.compact(CompactOptions::default()).await.expect("run again: planned from the table live now");
    let fresh = open(dir.path(), 1).await;
    assert!(fresh.read_changes(&o, 0, AsOf::Latest).await.expect("read").is_empty());
    assert_eq!(live_files(&fresh).await, 0);
}

/// Another engine changes the change table's schema under an open store (seq dropped and added
/// back, so it now comes after token; or an extra column added): appends and compaction refuse
/// with `InvalidInput` naming the columns. Before, records were written by column position, so
/// seq and token were swapped in the new file (both longs), and a compaction would have dropped
/// the other engine's column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_another_engine_changed_is_never_written_by_position() {
    use iceberg::spec::{PrimitiveType, Type};
    use iceberg::transaction::{AddColumn, ApplyTransactionAction, Transaction};
    for reorder in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let cold = open(dir.path(), 1).await;
        let o = ObjectId::new("o").expect("id");
        for seq in 1..=2 {
            let r = common::put(&o, seq, "k", "v", 5);
            cold.append(ColdBatch::single(o.clone(), FencingToken::new(5), vec![r])).await.expect("append");
        }
        let table = cold.refresh().await.expect("table");
        let tx = Transaction::new(&table);
        let update = if reorder {
            tx.update_schema()
                .delete_column("op")
                .add_column(AddColumn::optional("op", Type::Primitive(PrimitiveType::String)))
        } else {
            tx.update_schema().add_column(AddColumn::optional("extra", Type::Primitive(PrimitiveType::String)))
        };
        let tx = update.apply(tx).expect("apply");
        tx.commit(&*cold.catalog()).await.expect("another engine's schema change");
        cold.refresh().await.expect("the store sees it");
        let r = common::put(&o, 3, "k", "w", 5);
        let e = cold.append(ColdBatch::single(o.clone(), FencingToken::new(5), vec![r])).await.expect_err("refused");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "reorder {reorder}: {e}");
        assert!(e.to_string().contains("no longer) a dotdo change table"), "{e}");
        let e = cold.compact(CompactOptions::default()).await.expect_err("compaction refused");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "reorder {reorder}: {e}");
        assert_eq!(live_files(&cold).await, 2, "nothing written");
    }
}

/// A compaction whose new files are older than half of `min_cleanup_retention` when it comes
/// to commit (here: its clock runs two hours ahead of the store's file times) refuses to commit
/// (`Conflict`, nothing committed): a cleanup running meanwhile may already have judged those
/// files unreferenced and would delete them after the commit, under the new head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_whose_files_a_cleanup_could_take_does_not_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wall = dotdo_core::Clock::now(&dotdo_core::SystemClock::new());
    let clock = dotdo_core::ManualClock::new(wall.plus(std::time::Duration::from_secs(7200)));
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["m"], "changes")
        .settings(Settings { buckets: 1, ..Default::default() })
        .with_clock(Arc::new(clock))
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    for seq in 1..=3 {
        let r = common::put(&o, seq, &format!("k{seq}"), "v", 1);
        cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![r])).await.expect("append");
    }
    let before = cold.read_changes(&o, 0, AsOf::Latest).await.expect("read");
    let e = cold.compact(CompactOptions::default()).await.expect_err("files too old to commit safely");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(e.to_string().contains("min_cleanup_retention"), "{e}");
    assert_eq!(live_files(&cold).await, 3, "nothing committed");
    assert_eq!(cold.read_changes(&o, 0, AsOf::Latest).await.expect("read"), before);
}

/// A one-bucket store on a new table at `dir` with three puts of object `o` (key `k`), each
/// in a commit of its own, then compacted into one file.
async fn three_puts_compacted(dir: &std::path::Path) -> IcebergColdStore {
    let cold = open(dir, 1).await;
    let o = ObjectId::new("o").expect("id");
    for seq in 1..=3 {
        let r = common::put(&o, seq, "k", "v", 1);
        cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![r])).await.expect("append");
    }
    cold.compact(CompactOptions::default()).await.expect("compact");
    cold
}

/// Another engine's commit setting the table property `key` to `value`.
async fn set_table_property(cold: &IcebergColdStore, key: &str, value: &str) {
    use iceberg::transaction::{ApplyTransactionAction, Transaction};
    let table = cold.refresh().await.expect("table");
    let tx = Transaction::new(&table);
    let tx = tx.update_table_properties().set(key.to_string(), value.to_string()).apply(tx).expect("apply");
    tx.commit(&*cold.catalog()).await.expect("the property set");
}

/// Another engine's `write.data.path` with a trailing `/` (Iceberg-Java trims it): dotdo's data
/// files go under it, not `…//do_id_bucket=…` (no valid object path: every append failed,
/// `InvalidInput`, not retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_path_with_a_trailing_slash_takes_new_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let location = cold.table().metadata().location().to_string();
    set_table_property(&cold, "write.data.path", &format!("{location}/custom/")).await;
    drop(cold);
    let cold = open(dir.path(), 1).await;
    let o = ObjectId::new("o").expect("id");
    cold.append(common::one_put_each(std::slice::from_ref(&o), 1)).await.expect("append");
    let custom = common::files_ending_with(&dir.path().join("m/changes/custom"), ".parquet");
    assert_eq!(custom.len(), 1, "{custom:?}");
    assert!(!custom[0].to_string_lossy().contains("//"), "{custom:?}");
    assert_eq!(cold.load_state(&o, AsOf::Latest).await.expect("read").entries.len(), 1);
}

/// A table with `gc.enabled=false` (its files may be shared with another table) is neither
/// expired nor cleaned: both refuse with `InvalidInput` and delete nothing. (Cleanup ignored the
/// property and deleted unreferenced files; expiry failed as `Corrupt`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_disabled_tables_are_neither_expired_nor_cleaned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = three_puts_compacted(dir.path()).await;
    // Any value but "true" disables it, as Java's Boolean.parseBoolean reads it.
    set_table_property(&cold, "gc.enabled", "0").await;
    let snapshots = cold.snapshots().await.expect("snapshots").len();
    let files = common::files_ending_with(dir.path(), ".parquet").len();
    common::sleep(std::time::Duration::from_millis(5)).await;
    let e = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect_err("gc disabled");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("gc.enabled"), "{e}");
    let e = cold.remove_unreferenced_files(std::time::Duration::ZERO).await.expect_err("gc disabled");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert_eq!(cold.snapshots().await.expect("snapshots").len(), snapshots);
    assert_eq!(common::files_ending_with(dir.path(), ".parquet").len(), files, "nothing deleted");
}

/// A compaction whose planned table went stale while it wrote (another store compacted another
/// partition, expired the old snapshots and cleaned up, deleting the manifests the plan read)
/// builds its commit again on the current table and commits. It failed `Corrupt` ("missing"):
/// a healthy table reported damaged. Also with one commit attempt (the rebuild is not an
/// attempt of its own: with none left, the stale table's `Corrupt` was the answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_planned_on_a_table_cleaned_up_meanwhile_commits_on_the_current_one() {
    for attempts in [Settings::default().max_commit_attempts, 1] {
        compaction_on_a_table_cleaned_up_meanwhile(attempts).await;
    }
}

async fn compaction_on_a_table_cleaned_up_meanwhile(attempts: u32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let other = open(dir.path(), 2).await;
    let objects: Vec<ObjectId> = (0..8).map(|i| ObjectId::new(format!("obj-{i}")).expect("id")).collect();
    for seq in 1..=2 {
        for o in &objects {
            let r = common::put(o, seq, "k", &format!("v{seq}"), 1);
            other.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![r])).await.expect("append");
        }
    }
    let in_bucket = |b: usize| {
        common::files_ending_with(&dir.path().join(format!("m/changes/data/do_id_bucket={b}")), ".parquet").len()
    };
    assert!(in_bucket(0) >= 2 && in_bucket(1) >= 2, "both partitions have files to compact");
    let hooked = common::FaultyStore::quiet_local();
    let compactor = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .object_store(hooked.clone())
        .table(["m"], "changes")
        .settings(Settings {
            buckets: 2,
            min_cleanup_retention: std::time::Duration::ZERO,
            max_commit_attempts: attempts,
            ..Default::default()
        })
        .build()
        .await
        .expect("compactor");
    let (meanwhile, handle) = (other.clone(), tokio::runtime::Handle::current());
    // (On a blocking thread: a compaction's future inside the hook's boxed one is not `Send`.)
    let work = move || {
        handle.block_on(async {
            let one = CompactOptions { partitions: Some([1].into()), ..Default::default() };
            meanwhile.compact(one).await.expect("the other store compacts partition 1");
            common::sleep(std::time::Duration::from_millis(5)).await;
            meanwhile.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("expire");
            let cleaned = meanwhile.remove_unreferenced_files(std::time::Duration::ZERO).await.expect("cleanup");
            assert!(cleaned.deleted.iter().any(|f| f.ends_with(".avro")), "old manifests deleted: {cleaned:?}");
        })
    };
    *hooked.before_put.lock() = Some(common::PutHook(
        ".parquet".to_string(),
        Box::pin(async move { tokio::task::spawn_blocking(work).await.expect("the other store's work") }),
    ));
    let zero = CompactOptions { partitions: Some([0].into()), ..Default::default() };
    let report = compactor.compact(zero).await.unwrap_or_else(|e| panic!("{attempts} attempts: {e}"));
    assert!(hooked.before_put.lock().is_none(), "the other store ran during the compaction");
    assert!(report.snapshot.is_some(), "{report:?}");
    assert_eq!(live_files(&compactor).await, 2, "one file per partition, each compacted");
    for o in &objects {
        let seqs: Vec<u64> =
            compactor.read_changes(o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2], "{o}");
    }
}

/// Garbage collection turned off by another engine while a cleanup lists the table's files
/// (after its first read of the table said it was on) stops the cleanup: `InvalidInput`,
/// nothing deleted. The second read of the table, which saw the change, did not look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_turned_off_during_a_cleanup_stops_it() {
    use dotdo_core::Clock;
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = three_puts_compacted(dir.path()).await;
    common::sleep(std::time::Duration::from_millis(5)).await;
    writer.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("expire: the old files are unreferenced");
    let files = common::files_ending_with(dir.path(), ".parquet").len();
    assert_eq!(files, 4, "three replaced files and the compacted one");
    let hooked = common::FaultyStore::quiet_local();
    let ahead = dotdo_core::SystemClock::new().now().as_micros() + 3_600_000_000;
    let cleaner = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .object_store(hooked.clone())
        .with_clock(Arc::new(dotdo_core::ManualClock::new(Timestamp::from_micros(ahead))))
        .table(["m"], "changes")
        .settings(Settings { buckets: 1, min_cleanup_retention: std::time::Duration::ZERO, ..Default::default() })
        .build()
        .await
        .expect("cleaner");
    let other = writer.clone();
    *hooked.before_list.lock() = Some(common::PutHook(
        String::new(),
        Box::pin(async move { set_table_property(&other, "gc.enabled", "false").await }),
    ));
    let e = cleaner.remove_unreferenced_files(std::time::Duration::ZERO).await.expect_err("gc turned off");
    assert!(hooked.before_list.lock().is_none(), "the property changed during the listing");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("gc.enabled"), "{e}");
    assert_eq!(common::files_ending_with(dir.path(), ".parquet").len(), files, "nothing deleted");
}

/// A compaction whose first files pass half of `min_cleanup_retention` before its last group is
/// written stops there (`Conflict`, nothing committed, the rest not rewritten) instead of
/// rewriting everything and failing at the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_stops_once_its_first_files_are_too_old() {
    use dotdo_core::Clock;
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = dotdo_core::ManualClock::new(dotdo_core::SystemClock::new().now());
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["m"], "changes")
        .settings(Settings { buckets: 3, ..Default::default() })
        .with_clock(Arc::new(clock.clone()))
        .build()
        .await
        .expect("open");
    let objects: Vec<ObjectId> = (0..30).map(|i| ObjectId::new(format!("o{i}")).expect("id")).collect();
    for seq in 1..=2 {
        cold.append(common::one_put_each(&objects, seq)).await.expect("append");
    }
    let before = live_files(&cold).await;
    let written = Arc::new(parking_lot::Mutex::new(0usize));
    let w = written.clone();
    let c = clock.clone();
    let opts = CompactOptions {
        progress: Some(Arc::new(move |p: &Progress| {
            if let Progress::GroupWritten { done, of, .. } = p {
                assert_eq!(*of, 3, "three partitions to compact");
                *w.lock() = *done;
                if *done == 2 {
                    c.advance(std::time::Duration::from_secs(31 * 60));
                }
            }
        })),
        ..Default::default()
    };
    let e = cold.compact(opts).await.expect_err("too old to go on");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(e.to_string().contains("groups to go"), "{e}");
    assert_eq!(*written.lock(), 2, "the third group was not rewritten");
    assert_eq!(live_files(&cold).await, before, "nothing committed");
}

/// The age rule of compaction (files younger than half of `min_cleanup_retention` when it
/// commits) holds for user tables too, which `remove_unreferenced_files` cleans as well: with
/// the store's clock two hours ahead of the files' times, the compaction commits nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_table_compaction_is_held_to_the_cleanup_age_rule() {
    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let wall = dotdo_core::Clock::now(&dotdo_core::SystemClock::new());
    let clock = dotdo_core::ManualClock::new(wall.plus(std::time::Duration::from_secs(7200)));
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["m"], "changes")
        .with_clock(Arc::new(clock))
        .build()
        .await
        .expect("open");
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let t = cold.arrow_table(&["m"], "events", schema.clone()).await.expect("table");
    for id in 1..=3u64 {
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![id as i64]))]).expect("batch");
        t.append("s", id, vec![batch]).await.expect("append");
    }
    let e = t.compact(CompactOptions::default()).await.expect_err("files too old to commit safely");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(e.to_string().contains("min_cleanup_retention"), "{e}");
    let table = cold.catalog().load_table(t.ident()).await.expect("load");
    assert_eq!(table.metadata().current_snapshot().expect("head").summary().operation, Operation::Append);
    assert_eq!(common::files_ending_with(dir.path(), ".parquet").len(), 3, "the rewrite's file was deleted");
    let rows: usize = t.read_all().await.expect("read").iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 3);
}

/// A user table (one small file per append, as an `ArrowPipeline` writes) is compacted, its
/// snapshots expired and its unreferenced files removed: the replaced files and expired
/// manifest lists go, every row and every stream's batch mark stays (a replay of an old batch
/// still writes nothing), appends go on, and the change table's files are untouched. A store
/// opened with a larger `min_cleanup_retention` records it in the user table, and a cleanup
/// below it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_tables_are_expired_and_cleaned_up_keeping_their_marks() {
    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let o = ObjectId::new("o").expect("id");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 1, "k", "v", 1)]))
        .await
        .expect("change table append");
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let t = cold.arrow_table(&["m"], "events", schema.clone()).await.expect("table");
    let batch = |id: u64| {
        RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![id as i64, -(id as i64)]))])
            .expect("batch")
    };
    for id in 1..=6u64 {
        t.append("a", id, vec![batch(id)]).await.expect("append a");
    }
    t.append("b", 1, vec![batch(100)]).await.expect("append b");
    let in_table = |dir: &std::path::Path| common::files_ending_with(&dir.join("m").join("events"), ".parquet").len();
    let change_files = common::files_ending_with(&dir.path().join("m").join("changes"), ".parquet");
    assert_eq!(in_table(dir.path()), 7);
    let report = t.compact(CompactOptions::default()).await.expect("compact");
    assert_eq!((report.files_removed, report.files_added), (7, 1), "{report:?}");
    common::sleep(Duration::from_millis(20)).await;
    let expired = t.expire_snapshots(Duration::ZERO, 1).await.expect("expire");
    assert_eq!((expired.expired.len(), expired.retained), (7, 1), "{expired:?}");
    let clean = t.remove_unreferenced_files(Duration::ZERO).await.expect("cleanup");
    let parquet: Vec<&String> = clean.deleted.iter().filter(|d| d.ends_with(".parquet")).collect();
    assert_eq!(parquet.len(), 7, "the seven replaced files: {clean:?}");
    assert!(clean.deleted.iter().all(|d| d.contains("/m/events/")), "only the user table's files: {clean:?}");
    assert!(clean.deleted.iter().any(|d| d.contains("snap-")), "expired manifest lists: {clean:?}");
    assert_eq!(in_table(dir.path()), 1);
    assert_eq!(common::files_ending_with(&dir.path().join("m").join("changes"), ".parquet"), change_files);
    let mut values: Vec<i64> = t
        .read_all()
        .await
        .expect("read")
        .iter()
        .flat_map(|b| {
            let c = b.column(0).as_any().downcast_ref::<Int64Array>().expect("i64");
            c.values().to_vec()
        })
        .collect();
    values.sort();
    let mut want: Vec<i64> = (1..=6).chain([100]).flat_map(|i| [i, -i]).collect();
    want.sort();
    assert_eq!(values, want);
    assert_eq!((t.last_batch("a").await.expect("a"), t.last_batch("b").await.expect("b")), (6, 1));
    assert_eq!(t.append("a", 3, vec![batch(3)]).await.expect("replay").rows, 0, "batch 3 is still known");
    assert_eq!(t.append("a", 7, vec![batch(7)]).await.expect("append after cleanup").rows, 2);
    let rows: usize = t.read_all().await.expect("read").iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 16);
    assert_eq!(cold.read_changes(&o, 0, AsOf::Latest).await.expect("change table").len(), 1);

    // A store with a one-hour minimum opens the table: it records the minimum, and every
    // cleanup keeps to it.
    let strict = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["m"], "changes")
        .settings(Settings { buckets: 1, ..Default::default() })
        .build()
        .await
        .expect("open")
        .arrow_table(&["m"], "events", schema.clone())
        .await
        .expect("table");
    let table = cold.catalog().load_table(strict.ident()).await.expect("load");
    assert_eq!(table.metadata().properties().get(dotdo_iceberg::MIN_CLEANUP_PROP).map(String::as_str), Some("3600000"));
    let e = t.remove_unreferenced_files(Duration::from_secs(60)).await.expect_err("below the recorded minimum");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
}

/// Two processes opening the same new table at once: the one whose catalog insert loses (the
/// SQL catalog reports the unique-key clash as an unexpected error) uses the table the other
/// created (it failed with a non-retryable Backend). Namespace parts with a '.' are refused:
/// the catalog joins parts with it, so ["a.b"] and ["a", "b"] would be one namespace there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_creating_one_table_at_once_both_open_it() {
    use object_store::ObjectStore;
    let dir = tempfile::tempdir().expect("tempdir");
    let hooked = common::FaultyStore::quiet_local();
    let (reached_tx, reached_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    *hooked.before_put.lock() = Some(common::PutHook(
        ".metadata.json".into(),
        Box::pin(async move {
            let _ = reached_tx.send(());
            let _ = go_rx.await;
        }),
    ));
    let path = dir.path().to_str().expect("utf-8").to_string();
    let first = tokio::spawn({
        let (path, hooked) = (path.clone(), hooked.clone());
        async move { IcebergColdStore::builder(path).object_store(hooked).table(["m"], "changes").build().await }
    });
    reached_rx.await.expect("the first store is creating the table");
    let second =
        IcebergColdStore::builder(path.clone()).table(["m"], "changes").build().await.expect("the second creates it");
    go_tx.send(()).expect("release the first");
    let first = first.await.expect("task").expect("the first opens the table the second created");
    assert_eq!(first.table().metadata().uuid(), second.table().metadata().uuid());
    let e = IcebergColdStore::builder(path.clone()).table(["a.b"], "t").build().await.expect_err("a dotted part");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    // Settings that would be ignored or refused deep inside are refused up front.
    let mem: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let e = IcebergColdStore::builder(path.clone()).object_store(mem).option("aws_region", "x").build().await;
    assert_eq!(e.expect_err("options with a store of one's own").kind(), &ErrorKind::InvalidInput);
    let settings = Settings { catalog_name: String::new(), ..Default::default() };
    let e = IcebergColdStore::builder(path).settings(settings).build().await.expect_err("no catalog name");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
}

/// A catalog file that is not a database (damaged, or another program's file) is `Corrupt`, as
/// a damaged hot store is (it was Backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_file_that_is_not_a_database_is_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("catalog.db"), b"not a database at all, just text ".repeat(200)).expect("write");
    let e = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect_err("garbage catalog");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
}

/// A cleanup of unreferenced files that runs while a compaction is between writing its new
/// files and committing them (a compaction that outlasted the cleanup's retention) deletes
/// some of them: the compaction then refuses to commit a snapshot naming missing files
/// (`Conflict`), and the table still reads every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanup_during_a_compaction_never_lets_it_commit_missing_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 2).await;
    let cleaner = open(dir.path(), 2).await;
    let objects = objects();
    for n in 0..20u64 {
        let o = &objects[(n % 5) as usize];
        let r = common::put(o, n / 5 + 1, &format!("k{n}"), "v", 1);
        cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![r])).await.expect("append");
    }
    let mut before = Vec::new();
    for o in &objects {
        before.push(cold.read_changes(o, 0, AsOf::Latest).await.expect("read"));
    }
    let deleted = Arc::new(parking_lot::Mutex::new(0usize));
    let d = deleted.clone();
    let opts = CompactOptions {
        progress: Some(Arc::new(move |p: &Progress| {
            if matches!(p, Progress::GroupWritten { done: 1, .. }) {
                let cleaner = cleaner.clone();
                let n = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(async move {
                        cleaner.remove_unreferenced_files(std::time::Duration::ZERO).await.expect("cleanup")
                    })
                });
                *d.lock() += n.deleted.iter().filter(|f| f.ends_with(".parquet")).count();
            }
        })),
        ..Default::default()
    };
    let e = cold.compact(opts).await.expect_err("its new files are gone");
    assert!(*deleted.lock() > 0, "the cleanup deleted the compaction's first new files");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(e.to_string().contains("deleted before the commit"), "{e}");
    let fresh = open(dir.path(), 2).await;
    for (o, b) in objects.iter().zip(before) {
        assert_eq!(fresh.read_changes(o, 0, AsOf::Latest).await.expect("every row still reads"), b);
    }
}

/// A store in `dir` whose clock runs an hour ahead of the wall clock (another engine's), with
/// dotdo's commit of `o` (seq 1) and, on top, another engine's commit stamped by the wall clock:
/// an hour before its parent. Returns the store, its clock, the wall-clock time and `o`.
async fn dotdo_commit_then_an_earlier_stamped_foreign_one(
    dir: &std::path::Path,
) -> (IcebergColdStore, dotdo_core::ManualClock, Timestamp, ObjectId) {
    use dotdo_core::{Clock, ManualClock, SystemClock};
    let now = SystemClock::new().now();
    let clock = ManualClock::new(now.plus(std::time::Duration::from_secs(3600)));
    let cold = IcebergColdStore::builder(dir.to_str().expect("utf-8"))
        .table(["m"], "changes")
        .with_clock(Arc::new(clock.clone()))
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 1, "k", "v1", 1)]))
        .await
        .expect("dotdo's commit");
    foreign_commit(&cold).await;
    (cold, clock, now, o)
}

/// Time travel when another engine's clock is behind dotdo's: its snapshot, committed on top of
/// dotdo's, carries an earlier time than its parent. A read as of a time between the two does not
/// pick the foreign snapshot (which holds the parent's rows, committed after that time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_travel_never_picks_a_child_stamped_before_its_parent() {
    use dotdo_core::Clock;
    let dir = tempfile::tempdir().expect("tempdir");
    let hour = std::time::Duration::from_secs(3600);
    let (cold, clock, now, o) = dotdo_commit_then_an_earlier_stamped_foreign_one(dir.path()).await;
    // Half an hour from now: after the foreign stamp, before dotdo's.
    let between = now.plus(hour / 2);
    let st = cold.load_state(&o, AsOf::Timestamp(between)).await.expect("as of between");
    assert!(st.entries.is_empty(), "nothing existed yet at that time: {st:?}");
    assert_eq!(cold.load_state(&o, AsOf::Timestamp(clock.now())).await.expect("as of now").entries.len(), 1);
    // The times `snapshots()` reports are the ones reads go by: as of the foreign snapshot's
    // reported time, the read finds it (its raw stamp lies before its parent existed).
    let infos = cold.snapshots().await.expect("snapshots");
    assert_eq!(infos.len(), 2);
    assert!(infos[1].committed_at >= infos[0].committed_at, "{infos:?}");
    let st = cold.load_state(&o, AsOf::Timestamp(infos[1].committed_at)).await.expect("as of the foreign snapshot");
    assert_eq!(st.entries.len(), 1, "{st:?}");
    assert_eq!(st.snapshot, Some(infos[1].id));
    // As of the parent's own time, the parent: the child, counted as committed just after it,
    // is not picked (tied with it, it was, and a foreign delete of the rows read as done then).
    assert!(infos[1].committed_at > infos[0].committed_at, "{infos:?}");
    let st = cold.load_state(&o, AsOf::Timestamp(infos[0].committed_at)).await.expect("as of dotdo's snapshot");
    assert_eq!(st.snapshot, Some(infos[0].id), "{infos:?}");
}

/// Another engine's expiry (Spark's `expire_snapshots(retain_last => 1)`) removes dotdo's
/// snapshot under that engine's own snapshot stamped an hour earlier: the foreign head keeps its
/// time (just after dotdo's commit, recorded in the `dotdo.last-commit` property), so a read as
/// of a time between the two stamps still finds none of the rows committed after it (it fell back
/// to the head's raw stamp and answered with dotdo's row), and `snapshots()` reports the same time
/// as before the expiry; a dotdo commit on top is stamped no earlier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_snapshot_keeps_its_time_once_the_dotdo_snapshot_below_is_expired_elsewhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hour = std::time::Duration::from_secs(3600);
    let (cold, clock, now, o) = dotdo_commit_then_an_earlier_stamped_foreign_one(dir.path()).await;
    let between = now.plus(hour / 2);
    assert!(cold.load_state(&o, AsOf::Timestamp(between)).await.expect("before the expiry").entries.is_empty());
    let before = cold.snapshots().await.expect("snapshots")[1].clone();
    expire_all_but_the_head(&cold).await;
    let fresh = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["m"], "changes")
        .with_clock(Arc::new(clock.clone()))
        .build()
        .await
        .expect("reopen");
    let infos = fresh.snapshots().await.expect("snapshots");
    assert_eq!(infos.len(), 1);
    assert_eq!((infos[0].id, infos[0].committed_at), (before.id, before.committed_at), "the head's time stays");
    match fresh.load_state(&o, AsOf::Timestamp(between)).await {
        Ok(st) => assert!(st.entries.is_empty(), "rows committed after that time: {st:?}"),
        Err(e) => assert_eq!(e.kind(), &ErrorKind::NotFound, "{e}"),
    }
    let stamped = stamp_of_a_commit_with_the_system_clock(dir.path(), &o).await;
    assert!(
        stamped >= before.committed_at.as_micros(),
        "stamped {stamped}, its parent read at {:?}",
        before.committed_at
    );
}

/// The `dotdo.committed-at-us` of a commit of `o`'s record 2 by a store on the warehouse at
/// `dir` whose clock is right (the system clock).
async fn stamp_of_a_commit_with_the_system_clock(dir: &std::path::Path, o: &ObjectId) -> i64 {
    let right = IcebergColdStore::builder(dir.to_str().expect("utf-8"))
        .table(["m"], "changes")
        .build()
        .await
        .expect("open with the system clock");
    right
        .append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(o, 2, "k", "v2", 1)]))
        .await
        .expect("append");
    let head = right.refresh().await.expect("table").metadata().current_snapshot().cloned().expect("head");
    head.summary().additional_properties.get("dotdo.committed-at-us").expect("stamp").parse().expect("micros")
}

/// A dotdo commit on top of another engine's earlier-stamped snapshot (from a store whose clock
/// is right) is stamped no earlier than the time reads give its parent (its chain's latest
/// commit, dotdo's an hour ahead): its stored time must not depend on that ancestor staying in
/// the metadata (another engine's expiry, which goes by raw stamps, may remove it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_over_an_earlier_stamped_foreign_one_is_not_stamped_before_its_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ahead, _clock, _now, o) = dotdo_commit_then_an_earlier_stamped_foreign_one(dir.path()).await;
    // The foreign head's time as reads give it (just after its parent's).
    let infos = ahead.snapshots().await.expect("snapshots");
    let first = infos[1].committed_at;
    assert!(first > infos[0].committed_at, "{infos:?}");
    let stamped = stamp_of_a_commit_with_the_system_clock(dir.path(), &o).await;
    assert!(stamped >= first.as_micros(), "stamped {stamped}, its parent read at {}", first.as_micros());
}

/// Expiry ages a snapshot by the time reads go by (its chain's latest commit): another engine's
/// snapshot stamped an hour before its parent is as young as that parent. Expired by its raw
/// stamp, it cut the chain, and a read as of a time inside the retention window was `NotFound`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_ages_a_snapshot_stamped_before_its_parent_by_its_parent() {
    use dotdo_core::Clock;
    let dir = tempfile::tempdir().expect("tempdir");
    let minute = std::time::Duration::from_secs(60);
    let (cold, clock, _, o) = dotdo_commit_then_an_earlier_stamped_foreign_one(dir.path()).await;
    let first_at = clock.now();
    clock.advance(10 * minute);
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 2, "k", "v2", 1)]))
        .await
        .expect("dotdo's second commit");
    clock.advance(20 * minute);
    // Keep 40 minutes: the first commit (30 minutes old) and what was built on it stay.
    cold.expire_snapshots(40 * minute, 1).await.expect("expire");
    let st = cold.load_state(&o, AsOf::Timestamp(first_at.plus(5 * minute))).await.expect("within the window");
    assert_eq!(st.through, 1, "{st:?}");
    assert_eq!(cold.snapshots().await.expect("snapshots").len(), 3, "nothing inside the window expired");
}

/// A snapshot that counts as committed at an ancestor's later time keeps that ancestor through
/// expiry while it stays itself. Here the head is a commit of an older dotdo node whose clock is
/// behind (stamped 10 minutes from now; dotdo now stamps a commit no earlier than its chain, so
/// the commit is made by hand, with the watermarks it would carry) on top of another engine's
/// commit (stamped now) on top of the first node's (stamped an hour from now). With the older
/// two expired, the head counted as committed at its own stamp, and a read as of half an hour
/// from now picked it, holding the rows committed an hour from now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_keeps_the_ancestors_a_snapshots_time_comes_from() {
    use iceberg::transaction::{ApplyTransactionAction, Transaction};
    let dir = tempfile::tempdir().expect("tempdir");
    let hour = std::time::Duration::from_secs(3600);
    let (cold, clock, now, o) = dotdo_commit_then_an_earlier_stamped_foreign_one(dir.path()).await;
    let table = cold.refresh().await.expect("table");
    let first = table.metadata().snapshots().min_by_key(|s| s.sequence_number()).expect("dotdo's").clone();
    let mut props = first.summary().additional_properties.clone();
    props.retain(|k, _| k == "dotdo.watermarks");
    props.insert("dotdo.commit-id".into(), "an-older-node".into());
    props.insert("dotdo.committed-at-us".into(), now.plus(hour / 6).as_micros().to_string());
    let tx = Transaction::new(&table);
    let tx = tx.fast_append().set_snapshot_properties(props).apply(tx).expect("apply");
    tx.commit(&*cold.catalog()).await.expect("the older node's commit");
    let between = now.plus(hour / 2);
    assert!(cold.load_state(&o, AsOf::Timestamp(between)).await.expect("before expiry").entries.is_empty());
    // The first node expires everything but the head (all three are older than its clock).
    clock.advance(std::time::Duration::from_secs(60));
    cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("expire");
    assert_eq!(cold.snapshots().await.expect("snapshots").len(), 3, "the head keeps what its time comes from");
    let st = cold.load_state(&o, AsOf::Timestamp(between)).await.expect("as of between");
    assert!(st.entries.is_empty(), "nothing existed yet at that time: {st:?}");
}

/// A foreign snapshot younger than the expiry's cutoff stays, and so does the older dotdo
/// snapshot below it whose watermarks a read as of it needs (before, only the head's and the
/// tags' chains were kept, and `load_state` as of the foreign snapshot was `Corrupt`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_keeps_the_watermark_base_of_every_retained_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 4).await;
    let o = ObjectId::new("o").expect("id");
    let d1 = ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 1, "k", "v1", 1)]);
    cold.append(d1).await.expect("dotdo's first commit");
    let first = cold.table().metadata().current_snapshot_id().expect("the first commit");
    common::sleep(std::time::Duration::from_millis(3000)).await;
    foreign_commit(&cold).await;
    let foreign = cold.refresh().await.expect("table").metadata().current_snapshot_id().expect("head");
    let d2 = ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 2, "k", "v2", 1)]);
    cold.append(d2).await.expect("dotdo's second commit");
    // The cutoff falls between the first commit and the foreign one, half way by their own
    // stamps: placed from them just before the expiry (a fixed 1.5 s needed the foreign commit,
    // the second commit and the expiry's start within 1.5 s, which a loaded machine may miss).
    let stamp = |id: i64| {
        let t = cold.table();
        t.metadata().snapshot_by_id(id).expect("snapshot").timestamp_ms()
    };
    let mid = (stamp(first) + stamp(foreign)) / 2;
    assert!(stamp(foreign) - stamp(first) >= 2000, "3 s apart");
    let now = dotdo_core::Clock::now(&dotdo_core::SystemClock::new()).as_millis();
    let older_than = std::time::Duration::from_millis(u64::try_from(now - mid).expect("the past"));
    let report = cold.expire_snapshots(older_than, 1).await.expect("expire");
    assert!(report.expired.is_empty(), "the first commit is the foreign one's watermark base: {report:?}");
    let st = cold.load_state(&o, AsOf::Snapshot(foreign)).await.expect("as of the foreign snapshot");
    assert_eq!(st.through, 1);
    assert_eq!(st.entries.len(), 1);
}

/// `Settings::sync_local_files`: every file a local warehouse writes (data files, manifests,
/// manifest lists, metadata JSON, watermark checkpoints), for the table's creation, appends and a compaction, is fsynced
/// before its write reports success, each once; without the setting none is. The warehouse path
/// has a space, which the local store keeps percent-encoded in its directory names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_local_files_fsyncs_every_file_written() {
    let history = vec![vec![(0, 0, false), (1, 1, false)], vec![(0, 1, false), (2, 0, true)], vec![(3, 2, false)]];
    for sync in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let warehouse = dir.path().join("my lake");
        let cold = IcebergColdStore::builder(warehouse.to_str().expect("utf-8"))
            .table(["m"], "changes")
            // A watermark checkpoint file with every commit: it is synced like the others.
            .settings(Settings {
                buckets: 2,
                sync_local_files: sync,
                watermark_checkpoint_objects: 0,
                ..Default::default()
            })
            .build()
            .await
            .expect("open");
        for b in batches(&objects(), &history) {
            cold.append(b).await.expect("append");
        }
        cold.compact(CompactOptions::default()).await.expect("compact");
        let written: usize = [".parquet", ".avro", ".metadata.json"]
            .iter()
            .map(|suffix| common::files_ending_with(dir.path(), suffix).len())
            .sum();
        let checkpoints = common::files_ending_with(dir.path(), ".json")
            .iter()
            .filter(|f| f.to_string_lossy().contains("dotdo-watermarks-"))
            .count();
        assert!(checkpoints >= 3, "a checkpoint per append: {checkpoints}");
        let written = written + checkpoints;
        assert!(written >= 13, "a creation, three appends and a compaction wrote {written} files");
        let expected = if sync { written as u64 } else { 0 };
        assert_eq!(cold.synced_files(), expected, "sync_local_files = {sync}");
    }
}

/// A local warehouse whose path has a space (percent-encoded in its URL) is cleaned up like any
/// other: the local store lists decoded paths, the table's locations keep the encoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_works_in_a_local_warehouse_with_a_space_in_its_path() {
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let wh = dir.path().join("my lake");
    let cold = open(&wh, 1).await;
    let o = ObjectId::new("o").expect("id");
    for s in 1..=3 {
        cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, s, "k", "v", 1)]))
            .await
            .expect("append");
    }
    cold.compact(CompactOptions::default()).await.expect("compact");
    common::sleep(Duration::from_millis(20)).await;
    cold.expire_snapshots(Duration::ZERO, 1).await.expect("expire");
    let clean = cold.remove_unreferenced_files(Duration::ZERO).await.expect("cleanup");
    let parquet_deleted = clean.deleted.iter().filter(|d| d.ends_with(".parquet")).count();
    assert_eq!(parquet_deleted, 3, "the three replaced files: {clean:?}");
    assert_eq!(live_files(&cold).await, 1);
    let seqs: Vec<u64> = cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
}

/// `default_sqlite_uri` of a directory whose name holds what a URI treats specially (`?`, `#`,
/// `%`, a space) puts the catalog in that very directory, and a store works through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sql_catalog_in_a_directory_named_with_uri_characters_is_created_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let catalog_dir = dir.path().join("cat? #1 50%25");
    std::fs::create_dir(&catalog_dir).expect("mkdir");
    let uri = dotdo_iceberg::catalog::default_sqlite_uri(&catalog_dir);
    let wh = dir.path().join("wh");
    let cold = IcebergColdStore::builder(wh.to_str().expect("utf-8"))
        .catalog(dotdo_iceberg::CatalogConfig::Sql { uri: uri.clone() })
        .table(["m"], "changes")
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 1, "k", "v", 1)]))
        .await
        .expect("append");
    assert!(catalog_dir.join("catalog.db").is_file(), "the catalog is in {catalog_dir:?} ({uri})");
    let entries: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(entries.len(), 2, "nothing created beside the catalog directory and the warehouse: {entries:?}");
    assert_eq!(cold.watermark(&o).await.expect("watermark").through, 1);
}

/// A user schema with a column Iceberg cannot store exactly is refused before anything is
/// created (before, the table was created and then refused, and every later call failed the same
/// way); bad table names are `InvalidInput`, not `Corrupt`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_schema_without_an_exact_iceberg_form_creates_nothing() {
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let binary = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int32, false),
        Field::new("blob", DataType::Binary, true),
    ]));
    let e = cold.arrow_table(&["u"], "events", binary).await.expect_err("Binary reads back as LargeBinary");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("blob"), "names the column: {e}");
    let fine =
        Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false), Field::new("name", DataType::Utf8, true)]));
    cold.arrow_table(&["u"], "events", fine).await.expect("nothing was created under the name");
    let ok = Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false)]));
    // `#`, `?` and `%` would be read as a URL's fragment, query or escape by a REST catalog
    // client that joins names into its URLs as they are (`events#x` loaded `events`).
    for (ns, name) in [
        (vec!["u"], ""),
        (vec!["u"], ".."),
        (vec!["u"], "a/b"),
        (vec![], "t"),
        (vec![".."], "t"),
        (vec!["u"], "events#x"),
        (vec!["u"], "events?x=1"),
        (vec!["u"], "%2e%2e"),
        (vec!["u#x"], "t"),
    ] {
        let e = cold.arrow_table(&ns, name, ok.clone()).await.expect_err("a bad name");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{ns:?} {name:?}: {e}");
    }
}

/// A user table's data file cut to zero bytes reads as `Corrupt`, naming the file; before, the
/// read past its end was a retryable `Unavailable` (retried forever) that named no file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_table_file_cut_to_zero_bytes_is_corrupt() {
    use arrow_array::{Int32Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false)]));
    let t = cold.arrow_table(&["z"], "events", schema.clone()).await.expect("table");
    let b = RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from(vec![1, 2, 3]))]).expect("batch");
    t.append("s", 1, vec![b]).await.expect("append");
    let data = dir.path().join("z").join("events").join("data");
    let files: Vec<_> = std::fs::read_dir(&data).expect("data dir").map(|e| e.expect("entry").path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    std::fs::write(&files[0], b"").expect("truncate");
    let e = t.read_all().await.expect_err("a file with no bytes");
    assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Corrupt, false), "{e}");
    let name = files[0].file_name().expect("name").to_str().expect("utf-8");
    assert!(e.to_string().contains(name), "names {name}: {e}");
}

/// Compactions do not leave the manifest list growing: a manifest an earlier compaction left with
/// only the files it replaced (no live entry) is dropped by the next rewrite instead of being
/// carried, and loaded by every read, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_compactions_keep_the_manifest_list_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let o = ObjectId::new("o").expect("id");
    let mut seq = 0;
    for _ in 0..6 {
        for _ in 0..3 {
            seq += 1;
            let r = common::put(&o, seq, &format!("k{}", seq % 4), "v", 1);
            cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![r])).await.expect("append");
        }
        cold.compact(CompactOptions::default()).await.expect("compact");
    }
    let t = cold.refresh().await.expect("refresh");
    let s = t.metadata().current_snapshot().expect("snapshot");
    let manifests = t.manifest_list_reader(s).load().await.expect("list").entries().len();
    assert!(manifests <= 3, "{manifests} manifests after 6 compactions");
    assert_eq!(live_files(&cold).await, 1);
    let seqs: Vec<u64> = cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=18).collect::<Vec<_>>());
}

/// A user table with nested columns (a list of strings, a struct holding a list) takes appends
/// of batches built the usual Arrow way (element fields named "item", no field ids): every
/// append failed re-labelling the batch with Iceberg's types, which name and number nested
/// fields. The rows read back equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_tables_with_nested_columns_take_appends() {
    use arrow_array::builder::{Int64Builder, ListBuilder, StringBuilder};
    use arrow_array::{Array, Int64Array, RecordBatch, StructArray};
    use arrow_schema::{DataType, Field, Fields, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 2).await;
    let tags_type = DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
    let scores_type = DataType::List(Arc::new(Field::new("item", DataType::Int64, true)));
    let inner = Fields::from(vec![Field::new("n", DataType::Int64, true), Field::new("scores", scores_type, true)]);
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("tags", tags_type, true),
        Field::new("detail", DataType::Struct(inner.clone()), true),
    ]));
    let t = cold.arrow_table(&["m"], "nested", schema.clone()).await.expect("table");
    let mut tags = ListBuilder::new(StringBuilder::new());
    tags.values().append_value("a");
    tags.values().append_value("b");
    tags.append(true);
    tags.append(false);
    let mut scores = ListBuilder::new(Int64Builder::new());
    scores.values().append_value(7);
    scores.append(true);
    scores.append(true);
    let detail =
        StructArray::new(inner, vec![Arc::new(Int64Array::from(vec![Some(1), None])), Arc::new(scores.finish())], None);
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(Int64Array::from(vec![1, 2])), Arc::new(tags.finish()), Arc::new(detail)],
    )
    .expect("batch");
    let c = t.append("s", 1, vec![batch.clone()]).await.expect("append of nested columns");
    assert_eq!(c.rows, 2);
    let read = t.read_all().await.expect("read");
    assert_eq!(read.iter().map(RecordBatch::num_rows).sum::<usize>(), 2);
    let back = &read[0];
    let tags = back.column(1).as_any().downcast_ref::<arrow_array::ListArray>().expect("list");
    let first = tags.value(0);
    let first = first.as_any().downcast_ref::<arrow_array::StringArray>().expect("strings");
    assert_eq!((first.value(0), first.value(1)), ("a", "b"));
    assert!(tags.is_null(1));
    let detail = back.column(2).as_any().downcast_ref::<StructArray>().expect("struct");
    let n = detail.column(0).as_any().downcast_ref::<Int64Array>().expect("n");
    assert_eq!((n.value(0), n.is_null(1)), (1, true));
}

/// A batch whose struct column has the table's field types under other names, or in another
/// order, is refused (`InvalidInput`), nothing written: arrow's type equality compares struct
/// fields by position and type only, so `loc: Struct<lon, lat>` was taken for the table's
/// `Struct<lat, lon>` and each value landed in the other's column. The table's own shape lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn struct_columns_are_matched_by_field_name() {
    use arrow_array::{Float64Array, RecordBatch, StructArray};
    use arrow_schema::{DataType, Field, Fields, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 2).await;
    let loc = |a: &str, b: &str| {
        Fields::from(vec![Field::new(a, DataType::Float64, false), Field::new(b, DataType::Float64, false)])
    };
    let schema_of = |f: Fields| Arc::new(Schema::new(vec![Field::new("loc", DataType::Struct(f), false)]));
    let t = cold.arrow_table(&["m"], "places", schema_of(loc("lat", "lon"))).await.expect("table");
    let batch = |f: Fields| {
        let column = StructArray::new(
            f.clone(),
            vec![Arc::new(Float64Array::from(vec![52.5])), Arc::new(Float64Array::from(vec![13.4]))],
            None,
        );
        RecordBatch::try_new(schema_of(f), vec![Arc::new(column)]).expect("batch")
    };
    for (a, b) in [("lon", "lat"), ("latitude", "longitude")] {
        let e = t.append("s", 1, vec![batch(loc(a, b))]).await.expect_err("struct fields under other names");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    }
    assert!(t.read_all().await.expect("read").is_empty(), "nothing written");
    assert_eq!(t.append("s", 1, vec![batch(loc("lat", "lon"))]).await.expect("the table's shape").rows, 1);
    let read = t.read_all().await.expect("read");
    let back = read[0].column(0).as_any().downcast_ref::<StructArray>().expect("struct");
    let lat = back.column_by_name("lat").expect("lat").as_any().downcast_ref::<Float64Array>().expect("f64");
    assert_eq!(lat.value(0), 52.5);
}

/// A user table of no columns, or one naming a column twice, is refused when opened
/// (`InvalidInput`): the first could take no append, and matching batches by name would drop
/// the second's column; a batch naming a column twice is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_tables_without_columns_or_with_a_name_twice_are_refused() {
    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 2).await;
    let e = cold.arrow_table(&["m"], "none", Arc::new(Schema::empty())).await.expect_err("no columns");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    let twice =
        Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true), Field::new("a", DataType::Int64, true)]));
    let e = cold.arrow_table(&["m"], "twice", twice.clone()).await.expect_err("a name twice");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    let schema =
        Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true), Field::new("b", DataType::Int64, true)]));
    let t = cold.arrow_table(&["m"], "ok", schema).await.expect("table");
    let batch =
        RecordBatch::try_new(twice, vec![Arc::new(Int64Array::from(vec![1])), Arc::new(Int64Array::from(vec![2]))])
            .expect("batch");
    let e = t.append("s", 1, vec![batch]).await.expect_err("a batch naming a column twice");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(t.read_all().await.expect("read").is_empty(), "nothing written");
}

/// A table in `dir` (one bucket) with object `o` appended by a plain store (returned first); a
/// writer on a hookable object store (its `before_put` runs before a matching put) with a
/// manual clock starting now; and a cleaner whose manual clock is two hours ahead (a cleanup
/// long after the writer's files were written). Both with the default cleanup minimum (1 h).
async fn stalling_writer_and_cleaner(
    dir: &std::path::Path,
) -> (IcebergColdStore, Arc<common::FaultyStore>, dotdo_core::ManualClock, IcebergColdStore, IcebergColdStore) {
    stalling_writer_and_cleaner_with(dir, |c| Arc::new(c), Settings::default().min_cleanup_retention).await
}

/// A clock whose monotonic time stands still while its wall clock moves (a machine suspended:
/// `Instant` does not count the time asleep).
#[derive(Debug)]
struct Asleep(dotdo_core::ManualClock);

impl dotdo_core::Clock for Asleep {
    fn now(&self) -> dotdo_core::Timestamp {
        self.0.now()
    }
    fn monotonic(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    fn sleep(&self, d: std::time::Duration) -> dotdo_core::time::Sleep {
        self.0.sleep(d)
    }
}

/// [`stalling_writer_and_cleaner`] with the writer's clock made by `writer_clock` and its
/// `min_cleanup_retention` (the cleaner's is the default).
async fn stalling_writer_and_cleaner_with(
    dir: &std::path::Path,
    writer_clock: impl Fn(dotdo_core::ManualClock) -> Arc<dyn dotdo_core::Clock>,
    writer_min: std::time::Duration,
) -> (IcebergColdStore, Arc<common::FaultyStore>, dotdo_core::ManualClock, IcebergColdStore, IcebergColdStore) {
    use dotdo_core::Clock;
    let other = open(dir, 1).await;
    let o = ObjectId::new("o").expect("id");
    let one = FencingToken::new(1);
    other.append(ColdBatch::single(o.clone(), one, vec![common::put(&o, 1, "k", "v", 1)])).await.expect("append o");
    let hooked = common::FaultyStore::quiet_local();
    let now = dotdo_core::SystemClock::new().now();
    let clock = dotdo_core::ManualClock::new(now);
    let store = |clock: Arc<dyn dotdo_core::Clock>, hooked: Option<Arc<common::FaultyStore>>, min| async move {
        let b = IcebergColdStore::builder(dir.to_str().expect("utf-8"));
        let b = match hooked {
            Some(h) => b.object_store(h),
            None => b,
        };
        b.with_clock(clock)
            .table(["m"], "changes")
            .settings(Settings { buckets: 1, min_cleanup_retention: min, ..Default::default() })
            .build()
            .await
            .expect("open")
    };
    let writer = store(writer_clock(clock.clone()), Some(hooked.clone()), writer_min).await;
    let two_hours_on = dotdo_core::ManualClock::new(now.plus(std::time::Duration::from_secs(2 * 3600)));
    let cleaner = store(Arc::new(two_hours_on), None, Settings::default().min_cleanup_retention).await;
    (other, hooked, clock, writer, cleaner)
}

/// An append whose commit is retried long after it wrote its data files (a conflict, then
/// retries that took more than half of `min_cleanup_retention`) writes new files instead of
/// committing the old ones: a cleanup running meanwhile (here with the default minimum and a
/// clock two hours ahead, as after a long stall) may have deleted them as unreferenced.
/// Before, the retry committed the deleted files and the object's reads were `Corrupt`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_retried_past_half_the_cleanup_minimum_writes_new_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (other, hooked, clock, writer, cleaner) = stalling_writer_and_cleaner(dir.path()).await;
    let (o, p, q) = (ObjectId::new("o").expect("id"), ObjectId::new("p").expect("id"), ObjectId::new("q").expect("id"));
    let one = FencingToken::new(1);
    let deleted = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let (other2, p2, deleted2) = (other.clone(), p.clone(), deleted.clone());
    // Before the writer's first commit: another store commits (a conflict), 40 minutes pass for
    // the writer, and a cleanup deletes what no snapshot references.
    *hooked.before_put.lock() = Some(common::PutHook(
        "-m0.avro".into(),
        Box::pin(async move {
            other2.append(ColdBatch::single(p2.clone(), one, vec![common::put(&p2, 1, "k", "v", 1)])).await.expect("p");
            clock.advance(std::time::Duration::from_secs(40 * 60));
            let report =
                cleaner.remove_unreferenced_files(std::time::Duration::from_secs(3600)).await.expect("cleanup");
            deleted2.lock().extend(report.deleted);
        }),
    ));
    let c = writer.append(ColdBatch::single(q.clone(), one, vec![common::put(&q, 1, "k", "w", 1)])).await;
    c.expect("the append commits");
    assert!(hooked.before_put.lock().is_none(), "the hook ran");
    assert!(
        deleted.lock().iter().any(|f| f.ends_with(".parquet")),
        "the cleanup deleted the first files: {:?}",
        deleted.lock()
    );
    for (obj, v) in [(&o, "v"), (&p, "v"), (&q, "w")] {
        let st = other.load_state(obj, AsOf::Latest).await.expect("every file of the head is there");
        assert_eq!(st.entries.len(), 1, "{obj}");
        assert_eq!(&st.entries[0].value[..], v.as_bytes(), "{obj}");
    }
}

/// An append whose first attempt stalls past half of `min_cleanup_retention` between writing
/// its data files and its catalog swap (here while writing its manifest, with a cleanup running
/// meanwhile that deletes the files as unreferenced) does not commit them: the swap is refused
/// as a conflict and the append writes new files. Before, the snapshot named deleted files and
/// the object's reads were `Corrupt`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_stalled_past_half_the_cleanup_minimum_writes_new_files() {
    an_append_stalled_past_half_the_cleanup_minimum(|c| Arc::new(c)).await;
}

/// The same stall while the writer's machine is suspended: its monotonic clock stands still
/// while the wall clock (the cleanup's measure) moves 40 minutes. The files' age is the larger
/// of the two measures; by the monotonic one alone the append committed the deleted files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_stalled_through_a_suspend_writes_new_files() {
    an_append_stalled_past_half_the_cleanup_minimum(|c| Arc::new(Asleep(c))).await;
}

async fn an_append_stalled_past_half_the_cleanup_minimum(
    writer_clock: impl Fn(dotdo_core::ManualClock) -> Arc<dyn dotdo_core::Clock>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (other, hooked, clock, writer, cleaner) =
        stalling_writer_and_cleaner_with(dir.path(), writer_clock, Settings::default().min_cleanup_retention).await;
    // While the writer writes its first manifest: 40 minutes pass for it, and a cleanup deletes
    // what no snapshot references (its data files). No other commit: no conflict of its own.
    stall_clean_and_read(&other, &hooked, clock, &writer, cleaner, std::time::Duration::from_secs(40 * 60)).await;
}

/// `writer` appends `q` (`other` committed `o` before); while it writes its first manifest,
/// `stall` passes on its `clock` and `cleaner` removes unreferenced files at a 1 h retention
/// (deleting the append's first data files). The append commits, and `other` reads every
/// object whole: the writer did not commit the deleted files.
async fn stall_clean_and_read(
    other: &IcebergColdStore,
    hooked: &common::FaultyStore,
    clock: dotdo_core::ManualClock,
    writer: &IcebergColdStore,
    cleaner: IcebergColdStore,
    stall: std::time::Duration,
) {
    let (o, q) = (ObjectId::new("o").expect("id"), ObjectId::new("q").expect("id"));
    let deleted = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let deleted2 = deleted.clone();
    *hooked.before_put.lock() = Some(common::PutHook(
        "-m0.avro".into(),
        Box::pin(async move {
            clock.advance(stall);
            let report =
                cleaner.remove_unreferenced_files(std::time::Duration::from_secs(3600)).await.expect("cleanup");
            deleted2.lock().extend(report.deleted);
        }),
    ));
    let one = FencingToken::new(1);
    writer.append(ColdBatch::single(q.clone(), one, vec![common::put(&q, 1, "k", "w", 1)])).await.expect("append");
    assert!(hooked.before_put.lock().is_none(), "the hook ran");
    assert!(
        deleted.lock().iter().any(|f| f.ends_with(".parquet")),
        "the cleanup deleted the first files: {:?}",
        deleted.lock()
    );
    for (obj, v) in [(&o, "v"), (&q, "w")] {
        let st = other.load_state(obj, AsOf::Latest).await.expect("every file of the head is there");
        assert_eq!(st.entries.len(), 1, "{obj}");
        assert_eq!(&st.entries[0].value[..], v.as_bytes(), "{obj}");
    }
}

/// A writer whose own `min_cleanup_retention` (4 h) is above the minimum the table records (1 h:
/// another engine's edit here; a table dropped and created again by a store with a smaller
/// minimum records the same) keeps its uncommitted files to half of the table's: an append
/// stalled 90 minutes (past 30 min, within the 2 h its own minimum allows) writes new files
/// instead of committing the ones a cleanup at the table's 1 h minimum deleted meanwhile. By its
/// own minimum alone it committed the deleted files, and the object's reads were `Corrupt`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_keeps_to_half_the_tables_recorded_minimum_when_it_is_lower() {
    let dir = tempfile::tempdir().expect("tempdir");
    let four_hours = std::time::Duration::from_secs(4 * 3600);
    let (other, hooked, clock, writer, cleaner) =
        stalling_writer_and_cleaner_with(dir.path(), |c| Arc::new(c), four_hours).await;
    set_table_property(&other, dotdo_iceberg::MIN_CLEANUP_PROP, "3600000").await;
    stall_clean_and_read(&other, &hooked, clock, &writer, cleaner, std::time::Duration::from_secs(90 * 60)).await;
}

/// A store opened with a larger `min_cleanup_retention` records it in the table
/// (`dotdo.min-cleanup-retention-ms`, raised only): a cleanup on default settings elsewhere
/// refuses a retention below it (its compactions may commit files up to half of it old; the
/// cleanup used to judge by its own minimum alone and could delete them first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanups_keep_to_the_largest_minimum_a_writer_opened_the_table_with() {
    let dir = tempfile::tempdir().expect("tempdir");
    let with_min = |min: std::time::Duration| {
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .table(["m"], "changes")
            .settings(Settings { buckets: 1, min_cleanup_retention: min, ..Default::default() })
            .build()
    };
    let hour = std::time::Duration::from_secs(3600);
    let recorded =
        |c: &IcebergColdStore| c.table().metadata().properties().get(dotdo_iceberg::MIN_CLEANUP_PROP).cloned();
    let cleaner = with_min(hour).await.expect("default minimum");
    assert_eq!(recorded(&cleaner).as_deref(), Some("3600000"));
    let compactor = with_min(4 * hour).await.expect("a larger minimum");
    assert_eq!(recorded(&compactor).as_deref(), Some("14400000"));
    let e = cleaner.remove_unreferenced_files(hour).await.expect_err("below the table's minimum");
    assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains(dotdo_iceberg::MIN_CLEANUP_PROP), "{e}");
    cleaner.remove_unreferenced_files(4 * hour).await.expect("at the table's minimum");
    // Opening with a smaller minimum does not lower it.
    let later = with_min(hour).await.expect("reopen");
    assert_eq!(recorded(&later).as_deref(), Some("14400000"));
    assert_eq!(
        later.remove_unreferenced_files(2 * hour).await.expect_err("still below").kind(),
        &dotdo_core::ErrorKind::InvalidInput
    );
}

/// The SQL catalog's commits a store makes while it opens (raising the recorded cleanup
/// minimum; creating the table) are confirmed in the catalog: iceberg-catalog-sql ignores a
/// failed SQL `COMMIT` and reported both done, so a store opened as if its larger minimum were
/// recorded (a cleanup elsewhere could delete the files its compactions commit), or on a table
/// the catalog did not hold (every append then failed). The `COMMIT` is made to fail with a
/// deferred foreign-key violation a trigger adds (checked only at `COMMIT`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_made_while_opening_fail_when_the_catalog_does_not_keep_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let with_min = |table: &'static str, min: std::time::Duration| {
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .table(["m"], table)
            .settings(Settings { buckets: 1, min_cleanup_retention: min, ..Default::default() })
            .build()
    };
    let hour = std::time::Duration::from_secs(3600);
    drop(with_min("changes", hour).await.expect("first open"));
    let recorded = || {
        let c = rusqlite::Connection::open(dir.path().join("catalog.db")).expect("catalog db");
        let location: String = c
            .query_row("SELECT metadata_location FROM iceberg_tables WHERE table_name = 'changes'", [], |r| r.get(0))
            .expect("pointer");
        let path = location.strip_prefix("file://").unwrap_or(&location).to_string();
        let md: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).expect("metadata")).expect("metadata json");
        md["properties"][dotdo_iceberg::MIN_CLEANUP_PROP].as_str().map(str::to_string)
    };
    assert_eq!(recorded().as_deref(), Some("3600000"));
    let c = rusqlite::Connection::open(dir.path().join("catalog.db")).expect("catalog db");
    c.execute_batch(
        "CREATE TABLE p (id INTEGER PRIMARY KEY);
         CREATE TABLE ch (pid INTEGER REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED);
         CREATE TRIGGER refuse_update AFTER UPDATE OF metadata_location ON iceberg_tables
             BEGIN INSERT INTO ch VALUES (42); END;
         CREATE TRIGGER refuse_insert AFTER INSERT ON iceberg_tables BEGIN INSERT INTO ch VALUES (42); END;",
    )
    .expect("triggers");
    let e = with_min("changes", 6 * hour).await.expect_err("the larger minimum is not recorded");
    assert_eq!(recorded().as_deref(), Some("3600000"), "{e}");
    let e = with_min("other", hour).await.expect_err("the table is not in the catalog");
    assert!(e.is_retryable(), "{e}");
    let held: i64 =
        c.query_row("SELECT count(*) FROM iceberg_tables WHERE table_name = 'other'", [], |r| r.get(0)).expect("count");
    assert_eq!(held, 0);
    // With the catalog mended, both open.
    c.execute_batch("DROP TRIGGER refuse_update; DROP TRIGGER refuse_insert;").expect("drop triggers");
    with_min("changes", 6 * hour).await.expect("open with the larger minimum");
    assert_eq!(recorded().as_deref(), Some("21600000"));
    let other = with_min("other", hour).await.expect("create");
    other.append(common::one_put_each(&[ObjectId::new("o").expect("id")], 1)).await.expect("append");
}

/// A batch with a bad key refused by a store allowed one commit attempt whose known table is
/// stale (another store committed since): `InvalidInput`, as with more attempts. Judging the
/// refusal again on the current table used up the only attempt, and the append ended as a
/// retryable "could not be prepared", which no retry could ever get past.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_key_is_refused_also_with_one_attempt_on_a_stale_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["m"], "changes")
        .settings(Settings { buckets: 1, max_commit_attempts: 1, ..Default::default() })
        .build()
        .await
        .expect("open");
    let other = open(dir.path(), 1).await;
    other.append(common::one_put_each(&[ObjectId::new("b").expect("id")], 1)).await.expect("another commit");
    let o = ObjectId::new("o").expect("id");
    let bad = ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 1, "", "v", 1)]);
    let e = one.append(bad).await.expect_err("an empty key");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(!e.is_retryable(), "{e}");
    assert_eq!(one.watermark(&o).await.expect("watermark").through, 0);
}

/// A store with a larger minimum opened while a cleanup lists the table: the cleanup reads the
/// table again before deleting, minimum included, and keeps unreferenced files younger than
/// it (files of that store's compaction, maybe already being written). Before, it deleted them
/// by its first reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minimum_raised_during_a_cleanup_keeps_younger_files() {
    use dotdo_core::Clock;
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = open(dir.path(), 1).await;
    let o = ObjectId::new("o").expect("id");
    writer
        .append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 1, "k", "v", 1)]))
        .await
        .expect("append");
    // A data file no snapshot references (as a compaction's before it commits).
    let stray = common::files_ending_with(dir.path(), ".parquet")[0].with_file_name("in-flight.parquet");
    std::fs::write(&stray, b"PAR1 not yet committed").expect("stray file");
    let hooked = common::FaultyStore::quiet_local();
    let ahead = dotdo_core::SystemClock::new().now().plus(std::time::Duration::from_secs(2 * 3600));
    let cleaner = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .object_store(hooked.clone())
        .with_clock(Arc::new(dotdo_core::ManualClock::new(ahead)))
        .table(["m"], "changes")
        .settings(Settings { buckets: 1, ..Default::default() })
        .build()
        .await
        .expect("cleaner");
    let path = dir.path().to_str().expect("utf-8").to_string();
    *hooked.before_list.lock() = Some(common::PutHook(
        String::new(),
        Box::pin(async move {
            IcebergColdStore::builder(path)
                .table(["m"], "changes")
                .settings(Settings {
                    buckets: 1,
                    min_cleanup_retention: std::time::Duration::from_secs(4 * 3600),
                    ..Default::default()
                })
                .build()
                .await
                .expect("a store with a larger minimum");
        }),
    ));
    let report = cleaner.remove_unreferenced_files(std::time::Duration::from_secs(3600)).await.expect("cleanup");
    assert!(hooked.before_list.lock().is_none(), "the store opened during the listing");
    assert!(stray.exists(), "a file younger than the raised minimum was deleted: {report:?}");
    assert!(report.kept_recent >= 1, "{report:?}");
}

/// Settings of a reader that reads the table state it knows (`refresh_reads` off), on a
/// one-bucket table whose files a cleanup may take at once.
fn stale_reader_settings() -> Settings {
    Settings {
        buckets: 1,
        refresh_reads: false,
        min_cleanup_retention: std::time::Duration::ZERO,
        ..Default::default()
    }
}

/// On `writer`'s table, where `o` has one put at seq 1: a second put, then a compaction that
/// replaces the first snapshot's data file, an expiry of all but the head and a cleanup that
/// takes the replaced file; the cleanup's report.
async fn replace_the_first_snapshots_files(writer: &IcebergColdStore, o: &ObjectId) -> dotdo_iceberg::CleanupReport {
    let put = vec![common::put(o, 2, "k", "v2", 1)];
    writer.append(ColdBatch::single(o.clone(), FencingToken::new(1), put)).await.expect("append");
    writer.compact(CompactOptions::default()).await.expect("compact");
    writer.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("expire");
    writer.remove_unreferenced_files(std::time::Duration::ZERO).await.expect("cleanup")
}

/// A snapshot expired (and its files cleaned up) between a reader resolving it and reading its
/// files is `NotFound`, as an expired snapshot is, so a reader pinned to it re-pins; it used to
/// be `Corrupt` (a missing file), which the runtime does not re-pin on. The reader here reads the
/// table state it knows (`refresh_reads` off), which still lists the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_expired_while_it_is_read_is_not_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = open(dir.path(), 1).await;
    let o = ObjectId::new("o").expect("id");
    let one = FencingToken::new(1);
    let first = writer
        .append(ColdBatch::single(o.clone(), one, vec![common::put(&o, 1, "k", "v1", 1)]))
        .await
        .expect("append")
        .snapshot
        .expect("snapshot");
    let reader = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["m"], "changes")
        .settings(stale_reader_settings())
        .build()
        .await
        .expect("reader");
    assert_eq!(reader.load_state(&o, AsOf::Snapshot(first)).await.expect("as of the first").entries.len(), 1);
    // Readers of the latest state, each knowing only the first snapshot as the latest.
    let latest_readers = [(); 3].map(|()| {
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .table(["m"], "changes")
            .settings(stale_reader_settings())
    });
    let mut latest = Vec::new();
    for b in latest_readers {
        latest.push(b.build().await.expect("reader"));
    }
    // A compaction replaces the first snapshot's data file; expiry and cleanup take it.
    let report = replace_the_first_snapshots_files(&writer, &o).await;
    assert!(report.deleted.iter().any(|f| f.ends_with(".parquet")), "{report:?}");
    // The reader's known table still lists the first snapshot; its files are gone.
    assert!(reader.table().metadata().snapshot_by_id(first).is_some());
    let e = reader.load_state(&o, AsOf::Snapshot(first)).await.expect_err("expired");
    assert_eq!(e.kind(), &dotdo_core::ErrorKind::NotFound, "{e}");
    let e = reader.read_changes(&o, 0, AsOf::Snapshot(first)).await.expect_err("expired");
    assert_eq!(e.kind(), &dotdo_core::ErrorKind::NotFound, "{e}");
    let e = dotdo_core::IndexAccelerator::lookup(&reader, &o, "k", AsOf::Snapshot(first)).await.expect_err("expired");
    assert_eq!(e.kind(), &dotdo_core::ErrorKind::NotFound, "{e}");
    // A read of the latest state has nothing to re-pin: it reads the current table instead
    // (it was `NotFound` for a snapshot the caller never named).
    assert!(latest.iter().all(|r| r.table().metadata().current_snapshot_id() == Some(first)));
    let st = latest[0].load_state(&o, AsOf::Latest).await.expect("the current state");
    assert_eq!((st.through, st.entries[0].value.as_ref()), (2, &b"v2"[..]));
    let changes = latest[1].read_changes(&o, 0, AsOf::Latest).await.expect("the current changes");
    assert_eq!(changes.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2]);
    let l = dotdo_core::IndexAccelerator::lookup(&latest[2], &o, "k", AsOf::Latest).await.expect("the current value");
    assert_eq!(l.value.map(|v| v.value), Some(bytes::Bytes::from_static(b"v2")));
}

/// A store whose known table is old (it last read it before another store expired that head and
/// cleaned up its manifest list) appends all the same: it plans again on the current table. It
/// failed for good with `Corrupt`, since its commit reads the old head's manifest list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_on_a_stale_table_whose_head_was_cleaned_up_plans_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = || {
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .table(["m"], "changes")
            .settings(Settings { buckets: 1, min_cleanup_retention: std::time::Duration::ZERO, ..Default::default() })
            .build()
    };
    let (o, p) = (ObjectId::new("o").expect("id"), ObjectId::new("p").expect("id"));
    let one = FencingToken::new(1);
    let first = store().await.expect("first");
    first.append(ColdBatch::single(o.clone(), one, vec![common::put(&o, 1, "k", "v1", 1)])).await.expect("append");
    // `a` knows that head, and has read none of its files.
    let a = store().await.expect("a");
    let b = store().await.expect("b");
    b.append(ColdBatch::single(o.clone(), one, vec![common::put(&o, 2, "k", "v2", 1)])).await.expect("b appends");
    b.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("expire");
    let report = b.remove_unreferenced_files(std::time::Duration::ZERO).await.expect("cleanup");
    assert!(report.deleted.iter().any(|f| f.contains("/snap-")), "the old head's manifest list went: {report:?}");
    let c = a
        .append(ColdBatch::single(p.clone(), one, vec![common::put(&p, 1, "k", "v", 1)]))
        .await
        .expect("planned again on the current table");
    assert_eq!(c.records_written, 1);
    assert_eq!(a.watermark(&o).await.expect("wm").through, 2);
    assert_eq!(a.load_state(&p, AsOf::Latest).await.expect("state").entries.len(), 1);
}

/// A read that finds a file missing while the catalog cannot be reached (so whether its snapshot
/// expired meanwhile cannot be told) is a retryable error, not a `Corrupt` for good: a reader
/// pinned to an expired snapshot failed for good instead of re-pinning on its retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_file_read_while_the_catalog_is_unreachable_is_retryable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = open(dir.path(), 1).await;
    let o = ObjectId::new("o").expect("id");
    let one = FencingToken::new(1);
    let first = writer
        .append(ColdBatch::single(o.clone(), one, vec![common::put(&o, 1, "k", "v1", 1)]))
        .await
        .expect("append")
        .snapshot
        .expect("snapshot");
    let uri = dotdo_iceberg::catalog::default_sqlite_uri(dir.path());
    let (build, slot) = common::switched_sql_catalog(uri, format!("file://{}", dir.path().display()));
    let reader = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .catalog(dotdo_iceberg::CatalogConfig::Custom(build))
        .table(["m"], "changes")
        .settings(stale_reader_settings())
        .build()
        .await
        .expect("reader");
    replace_the_first_snapshots_files(&writer, &o).await;
    let catalog = slot.lock().clone().expect("the reader's catalog");
    catalog.fail_loads.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = reader.load_state(&o, AsOf::Snapshot(first)).await.expect_err("a file is missing");
    assert!(e.is_retryable(), "{e}");
    assert_ne!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("missing") || e.to_string().contains("not found"), "names the missing file: {e}");
    catalog.fail_loads.store(false, std::sync::atomic::Ordering::SeqCst);
    let e = reader.load_state(&o, AsOf::Snapshot(first)).await.expect_err("expired");
    assert_eq!(e.kind(), &dotdo_core::ErrorKind::NotFound, "the retry tells: {e}");
}

/// Decimal values with more digits than their column's precision are `InvalidInput`, nothing
/// written: Arrow does not check them, and the Parquet writer stored them cut to the precision's
/// physical width (4294967297 in a `decimal(5,2)` read back as 0.01) or out of range. Also in a
/// struct and in a list. A batch without columns is refused (its rows would be all nulls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decimals_beyond_their_precision_and_batches_without_columns_are_refused() {
    use arrow_array::builder::{Decimal128Builder, ListBuilder};
    use arrow_array::{ArrayRef, Decimal128Array, RecordBatch, StructArray};
    use arrow_schema::{DataType, Field, Fields, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let dec = DataType::Decimal128(5, 2);
    let inner = Fields::from(vec![Field::new("d", dec.clone(), true)]);
    let schema = Arc::new(Schema::new(vec![
        Field::new("top", dec.clone(), true),
        Field::new("s", DataType::Struct(inner.clone()), true),
        Field::new("l", DataType::List(Arc::new(Field::new("item", dec.clone(), true))), true),
    ]));
    let t = cold.arrow_table(&["m"], "decimals", schema.clone()).await.expect("table");
    let column = |v: i128| -> ArrayRef {
        Arc::new(Decimal128Array::from(vec![Some(v)]).with_precision_and_scale(5, 2).expect("type"))
    };
    let list = |v: i128| -> ArrayRef {
        let mut b = ListBuilder::new(Decimal128Builder::new().with_data_type(dec.clone()));
        b.values().append_value(v);
        b.append(true);
        Arc::new(b.finish())
    };
    let batch = |top: i128, nested: i128, listed: i128| {
        let s = StructArray::new(inner.clone(), vec![column(nested)], None);
        RecordBatch::try_new(schema.clone(), vec![column(top), Arc::new(s), list(listed)]).expect("batch")
    };
    for (what, b) in [
        ("a column", batch(4_294_967_297, 1, 1)),
        ("a column, in range of the physical type", batch(10_000_000, 1, 1)),
        ("a struct field", batch(1, -100_000, 1)),
        ("a list item", batch(1, 1, 123_456)),
    ] {
        let e = t.append("s", 1, vec![b]).await.expect_err(what);
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{what}: {e}");
    }
    assert_eq!(t.last_batch("s").await.expect("mark"), 0, "nothing committed");
    let ok = t.append("s", 1, vec![batch(99_999, -99_999, 12_345)]).await.expect("the largest values of decimal(5,2)");
    assert_eq!(ok.rows, 1);
    let read = t.read_all().await.expect("read");
    let top = read[0].column(0).as_any().downcast_ref::<Decimal128Array>().expect("decimal").value(0);
    assert_eq!(top, 99_999);
    let empty = RecordBatch::try_new_with_options(
        Arc::new(Schema::empty()),
        vec![],
        &arrow_array::RecordBatchOptions::new().with_row_count(Some(1000)),
    )
    .expect("a batch of no columns");
    let e = t.append("s", 2, vec![empty.clone()]).await.expect_err("no columns");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert_eq!(t.last_batch("s").await.expect("mark"), 1);
    // A replay of a committed batch is answered as committed whatever it holds (a pipeline log
    // written by an older version may hold such a batch, committed then): its log drains.
    for (what, b) in [("wide decimals", batch(4_294_967_297, 1, 1)), ("no columns", empty)] {
        let replay = t.append("s", 1, vec![b]).await.expect(what);
        assert_eq!((replay.rows, replay.snapshot), (0, None), "{what}");
    }
}

/// A `Time64(Microsecond)` value outside a day (PostgreSQL's `24:00:00`, a negative time) is
/// `InvalidInput` naming the column, nothing written: iceberg's `time` holds a time of day, and
/// iceberg-rust refused the value when it gathered the data file's statistics, after writing the
/// file: each commit failed as `Backend` and left an orphaned file. Also in a list. The first and
/// last microsecond of a day go in and read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_outside_a_day_are_refused() {
    use arrow_array::builder::{ListBuilder, Time64MicrosecondBuilder};
    use arrow_array::{ArrayRef, RecordBatch, Time64MicrosecondArray};
    use arrow_schema::{DataType, Field, Schema, TimeUnit};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let time = DataType::Time64(TimeUnit::Microsecond);
    let schema = Arc::new(Schema::new(vec![
        Field::new("at", time.clone(), true),
        Field::new("l", DataType::List(Arc::new(Field::new("item", time.clone(), true))), true),
    ]));
    let t = cold.arrow_table(&["m"], "times", schema.clone()).await.expect("table");
    let batch = |at: i64, listed: i64| {
        let mut l = ListBuilder::new(Time64MicrosecondBuilder::new());
        l.values().append_value(listed);
        l.append(true);
        let at: ArrayRef = Arc::new(Time64MicrosecondArray::from(vec![Some(at)]));
        RecordBatch::try_new(schema.clone(), vec![at, Arc::new(l.finish())]).expect("batch")
    };
    let day = 86_400_000_000i64;
    for (what, b) in [("24:00:00", batch(day, 0)), ("a negative time", batch(-1, 0)), ("a list item", batch(0, day))] {
        let e = t.append("s", 1, vec![b]).await.expect_err(what);
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{what}: {e}");
    }
    let e = t.append("s", 1, vec![batch(day, 0)]).await.expect_err("24:00:00");
    assert!(e.to_string().contains("column at"), "names the column: {e}");
    assert_eq!(t.last_batch("s").await.expect("mark"), 0, "nothing committed");
    let ok =
        t.append("s", 1, vec![batch(0, day - 1), batch(day - 1, 0)]).await.expect("the first and last microsecond");
    assert_eq!(ok.rows, 2);
    let read = t.read_all().await.expect("read");
    let mut at: Vec<i64> = read
        .iter()
        .flat_map(|b| b.column(0).as_any().downcast_ref::<Time64MicrosecondArray>().expect("time").values().to_vec())
        .collect();
    at.sort();
    assert_eq!(at, vec![0, day - 1]);
}

/// A batch from before a column was added, whose list column names its item `item` (arrow's
/// `ListBuilder`) where the table's schema says `element`, is given the new column as nulls:
/// it was `InvalidInput` (arrow builds a batch only from exactly equal types).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_batch_whose_list_item_has_another_name_is_conformed() {
    use arrow_array::builder::{ListBuilder, StringBuilder};
    use arrow_array::RecordBatch;
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let element = DataType::List(Arc::new(Field::new("element", DataType::Utf8, true)));
    let schema = Arc::new(Schema::new(vec![Field::new("tags", element, true)]));
    let t = cold.arrow_table(&["m"], "tagged", schema).await.expect("table");
    let batch = || {
        let mut b = ListBuilder::new(StringBuilder::new());
        b.values().append_value("a");
        b.append(true);
        let tags = b.finish();
        let item = Arc::new(Schema::new(vec![Field::new("tags", arrow_array::Array::data_type(&tags).clone(), true)]));
        RecordBatch::try_new(item, vec![Arc::new(tags)]).expect("batch")
    };
    t.append("s", 1, vec![batch()]).await.expect("the table's shape, item named otherwise");
    let added = t.add_column("note", DataType::Utf8).await.expect("add a column");
    assert_eq!(added.append("s", 2, vec![batch()]).await.expect("an older batch").rows, 1);
    let rows: usize = added.read_all().await.expect("read").iter().map(RecordBatch::num_rows).sum();
    assert_eq!(rows, 2);
}

/// A replay through a handle opened again with the schema another engine changed (a column
/// dropped), of a batch in the old shape (from a pipeline's log), is answered as committed: it
/// was `InvalidInput` (the batch has a column the table no longer has), and the log never
/// drained. A new batch in the old shape is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_in_the_old_shape_through_a_reopened_handle_is_answered_as_committed() {
    use arrow_array::{Int64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use iceberg::transaction::{ApplyTransactionAction, Transaction};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let old =
        Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false), Field::new("tag", DataType::Utf8, true)]));
    let t = cold.arrow_table(&["m"], "events", old.clone()).await.expect("table");
    let batch = |n: i64| {
        RecordBatch::try_new(
            old.clone(),
            vec![Arc::new(Int64Array::from(vec![n])), Arc::new(StringArray::from(vec!["x"]))],
        )
        .expect("batch")
    };
    t.append("s", 1, vec![batch(1)]).await.expect("batch 1");
    let table = cold.catalog().load_table(t.ident()).await.expect("load");
    let tx = Transaction::new(&table);
    let tx = tx.update_schema().delete_column("tag").apply(tx).expect("apply");
    tx.commit(&*cold.catalog()).await.expect("another engine drops a column");
    let new = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let reopened = cold.arrow_table(&["m"], "events", new).await.expect("opened with the new schema");
    let replay = reopened.append("s", 1, vec![batch(1)]).await.expect("a replay is answered");
    assert_eq!((replay.rows, replay.snapshot), (0, None));
    let e = reopened.append("s", 2, vec![batch(2)]).await.expect_err("a new batch in the old shape");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
}

/// A replay of a committed batch through a handle whose schema another engine has since changed
/// (a column dropped) is answered as committed (0 rows), as a pipeline replaying its log after
/// a restart needs; only a new batch is refused for the schema. The replay was `InvalidInput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_after_another_engine_changed_the_schema_is_answered_as_committed() {
    use arrow_array::{Int64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use iceberg::transaction::{ApplyTransactionAction, Transaction};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let schema =
        Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false), Field::new("tag", DataType::Utf8, true)]));
    let t = cold.arrow_table(&["m"], "events", schema.clone()).await.expect("table");
    let batch = |n: i64| {
        RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![n])), Arc::new(StringArray::from(vec!["x"]))],
        )
        .expect("batch")
    };
    assert_eq!(t.append("s", 1, vec![batch(1)]).await.expect("batch 1").rows, 1);
    let table = cold.catalog().load_table(t.ident()).await.expect("load");
    let tx = Transaction::new(&table);
    let tx = tx.update_schema().delete_column("tag").apply(tx).expect("apply");
    tx.commit(&*cold.catalog()).await.expect("another engine drops a column");
    let replay = t.append("s", 1, vec![batch(1)]).await.expect("a replay is answered");
    assert_eq!((replay.rows, replay.snapshot), (0, None));
    let e = t.append("s", 2, vec![batch(2)]).await.expect_err("a new batch meets the new schema");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert_eq!(t.last_batch("s").await.expect("mark"), 1);
}

/// A snapshot another node expires and cleans up while a cleanup reads the table (its manifest
/// list deleted under the reader): the cleanup reads the table again and finishes, deleting
/// nothing live. It failed with `Corrupt` naming the missing file, for an intact table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_expired_and_cleaned_up_during_a_cleanup_does_not_fail_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = open(dir.path(), 1).await;
    let o = ObjectId::new("o").expect("id");
    for seq in 1..=3 {
        put_at(&writer, &o, seq).await;
    }
    let table = writer.refresh().await.expect("table");
    let oldest = table.metadata().snapshots().min_by_key(|s| s.sequence_number()).expect("snapshots");
    let list = oldest.manifest_list().to_string();
    let name = list.rsplit('/').next().expect("file name").to_string();
    let (hooked, cleaner) = hooked_cleaner(dir.path()).await;
    let other = writer.clone();
    *hooked.before_get.lock() = Some(common::PutHook(
        name,
        Box::pin(async move {
            other.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("expire");
            let path = list.strip_prefix("file://").expect("local");
            std::fs::remove_file(path).expect("the other node's cleanup deletes the manifest list");
        }),
    ));
    common::sleep(std::time::Duration::from_millis(20)).await;
    let first = cleaner.remove_unreferenced_files(std::time::Duration::ZERO).await.expect("cleanup");
    assert!(hooked.before_get.lock().is_none(), "the expiry ran during the cleanup's read");
    // What the first read of the table gathered (snapshots are read in no set order) stayed
    // kept; the next cleanup takes it.
    let second = cleaner.remove_unreferenced_files(std::time::Duration::ZERO).await.expect("cleanup");
    let lists = first.deleted.iter().chain(&second.deleted).filter(|f| f.contains("/snap-")).count();
    assert_eq!(lists, 1, "the other expired snapshot's list went: {first:?} {second:?}");
    let fresh = open(dir.path(), 1).await;
    let state = fresh.load_state(&o, AsOf::Latest).await.expect("every file of the head is there");
    assert_eq!(state.through, 3);
    assert_eq!(fresh.read_changes(&o, 0, AsOf::Latest).await.expect("history of the head").len(), 3);
}

/// A file the table names at a location this store does not map to its keys (another engine's
/// spelling of the same bucket: `s3://bkt/…` for a store opened on `https://host/bkt/…`) may be
/// the very file the cleanup lists under its own name: a listed file of that name is kept, not
/// deleted as unreferenced. (It was deleted while the table still referenced it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_named_by_another_spelling_of_the_store_is_not_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let o = ObjectId::new("o").expect("id");
    let head = put_at(&cold, &o, 1).await;
    let table = cold.refresh().await.expect("table");
    let location = table.metadata().location().to_string();
    let local = format!("{}/metadata/stats-{head}.puffin", location.strip_prefix("file://").expect("local"));
    std::fs::write(&local, b"PFA1 statistics another engine wrote").expect("write statistics");
    let unlisted = format!("{}/metadata/left-over.puffin", location.strip_prefix("file://").expect("local"));
    std::fs::write(&unlisted, b"PFA1 a file nothing names").expect("write");
    common::edit_metadata(table.metadata_location().expect("metadata"), |json| {
        json["statistics"] = serde_json::json!([{
            "snapshot-id": head,
            "statistics-path": format!("s3://bkt/wh/m/changes/metadata/stats-{head}.puffin"),
            "file-size-in-bytes": 36,
            "file-footer-size-in-bytes": 4,
            "blob-metadata": [],
        }]);
    });
    common::sleep(std::time::Duration::from_millis(20)).await;
    let fresh = open(dir.path(), 1).await;
    let report = fresh.remove_unreferenced_files(std::time::Duration::ZERO).await.expect("cleanup");
    assert!(std::path::Path::new(&local).exists(), "a file of the name the table references is kept: {report:?}");
    assert_eq!(report.kept_named_elsewhere, 1, "{report:?}");
    assert!(!std::path::Path::new(&unlisted).exists(), "a file nothing names goes: {report:?}");
    assert_eq!(fresh.load_state(&o, AsOf::Latest).await.expect("state").through, 1);
}

/// A compaction of a format-v1 user table (appended to like any other) is refused before any
/// group is read or written: it rewrote every group, then the commit refused, and deleted its
/// output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_user_table_compaction_is_refused_before_rewriting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 4).await;
    let (user, rows) = v1_user_table(&cold).await;
    for n in 1..=3 {
        user.append("s", n, vec![rows.clone()]).await.expect("append");
    }
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = written.clone();
    let opts = CompactOptions {
        progress: Some(Arc::new(move |p: &Progress| {
            if matches!(p, Progress::GroupWritten { .. }) {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })),
        ..Default::default()
    };
    let e = user.compact(opts).await.expect_err("v1 is not rewritten");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert_eq!(written.load(std::sync::atomic::Ordering::SeqCst), 0, "no group rewritten first");
    let read: usize = user.read_all().await.expect("read").iter().map(|b| b.num_rows()).sum();
    assert_eq!(read, 6);
}

/// Data files' columns are found by field id, not name: a file whose `type` column is named
/// `kind` (another engine renamed the column, appended, and renamed it back; Iceberg ties data
/// to field ids) is read, looked up and compacted like the others. It was `Corrupt` ("has no
/// column type"), and with columns renamed into each other and the old schemas gone, reads
/// pruned by one column's bounds (field id) while reading another's values (name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_file_columns_are_found_by_field_id_not_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 1).await;
    let o = ObjectId::new("o").expect("id");
    put_at(&cold, &o, 1).await;
    // Rename the `type` column of the one data file's Parquet schema to `kind`, in place (a
    // string of the same length in the footer's Thrift: the file keeps its size).
    let files = common::files_ending_with(dir.path(), ".parquet");
    assert_eq!(files.len(), 1, "{files:?}");
    let mut bytes = std::fs::read(&files[0]).expect("read");
    let footer_len = u32::from_le_bytes(bytes[bytes.len() - 8..bytes.len() - 4].try_into().expect("4 bytes")) as usize;
    let footer = bytes.len() - 8 - footer_len..bytes.len() - 8;
    let mut renamed = 0;
    for i in footer.clone() {
        if bytes[i..].starts_with(b"\x08type") || bytes[i..].starts_with(b"\x04type") {
            bytes[i + 1..i + 5].copy_from_slice(b"kind");
            renamed += 1;
        }
    }
    assert!(renamed >= 1, "the column's name found in the footer");
    // And in the Arrow schema the writer embedded (base64 of an IPC schema; a string there is
    // a little-endian u32 length and its bytes), as a writer of the renamed column has it.
    let key = b"ARROW:schema";
    let at = bytes[footer.clone()].windows(key.len()).position(|w| w == key).expect("an embedded Arrow schema")
        + footer.start
        + key.len();
    // Thrift: the value's field header, then its varint length, then the base64 text.
    let text_at = (at..at + 8).find(|&i| bytes[i] & 0x80 == 0 && i > at).expect("length") + 1;
    let end = (text_at..footer.end).find(|&i| !is_b64(bytes[i])).expect("end of the text");
    let mut ipc = b64_decode(&bytes[text_at..end]);
    let mut in_schema = 0;
    for i in 0..ipc.len().saturating_sub(8) {
        if ipc[i..].starts_with(b"\x04\0\0\0type") {
            ipc[i + 4..i + 8].copy_from_slice(b"kind");
            in_schema += 1;
        }
    }
    assert_eq!(in_schema, 1, "the column's name in the Arrow schema");
    let text = b64_encode(&ipc);
    assert_eq!(text.len(), end - text_at);
    bytes[text_at..end].copy_from_slice(&text);
    std::fs::write(&files[0], &bytes).expect("write");
    let fresh = open(dir.path(), 1).await;
    let changes = fresh.read_changes(&o, 0, AsOf::Latest).await.expect("read by field id");
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].type_name, "T", "{changes:?}");
    let state = fresh.load_state(&o, AsOf::Latest).await.expect("state");
    assert_eq!(state.entries.len(), 1);
    assert!(fresh.lookup(&o, "k", AsOf::Latest).await.expect("lookup").value.is_some());
    put_at(&fresh, &o, 2).await;
    let report = fresh.compact(CompactOptions::default()).await.expect("compaction reads it too");
    assert!(report.snapshot.is_some(), "{report:?}");
    assert_eq!(fresh.read_changes(&o, 0, AsOf::Latest).await.expect("read").len(), 2);
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn is_b64(c: u8) -> bool {
    B64.contains(&c) || c == b'='
}

fn b64_decode(text: &[u8]) -> Vec<u8> {
    let value = |c: u8| B64.iter().position(|&b| b == c).expect("base64") as u32;
    let mut out = Vec::new();
    for chunk in text.chunks(4) {
        let n = chunk.iter().filter(|&&c| c != b'=').count();
        let mut v = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            v |= if c == b'=' { 0 } else { value(c) } << (18 - 6 * i);
        }
        out.extend_from_slice(&[(v >> 16) as u8, (v >> 8) as u8, v as u8][..n - 1]);
    }
    out
}

fn b64_encode(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in bytes.chunks(3) {
        let v = chunk.iter().enumerate().fold(0u32, |v, (i, &b)| v | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() { B64[(v >> (18 - 6 * i)) as usize & 63] } else { b'=' });
        }
    }
    out
}

/// A manifest that cannot be read while the table moves on (here damaged, as another engine's
/// file dotdo cannot decode would be, with an append landing meanwhile): the cleanup reads the
/// newer table, finds the manifest failing again, and fails `Corrupt`, deleting nothing. It
/// took the manifest as read on the second pass (recorded before its failed load), its data
/// files unreferenced, and deleted them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_that_fails_while_the_table_moves_on_keeps_its_data_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = open(dir.path(), 1).await;
    let o = ObjectId::new("o").expect("id");
    for seq in 1..=2 {
        put_at(&writer, &o, seq).await;
    }
    let table = writer.refresh().await.expect("table");
    let head = table.metadata().current_snapshot().expect("head").clone();
    let list = table.manifest_list_reader(&head).load().await.expect("list");
    let manifest = list.entries().iter().map(|m| m.manifest_path.clone()).min().expect("a manifest");
    let name = manifest.rsplit('/').next().expect("file name").to_string();
    let data_before = common::files_ending_with(dir.path(), ".parquet");
    assert_eq!(data_before.len(), 2);
    let (hooked, cleaner) = hooked_cleaner(dir.path()).await;
    let (other, o2) = (writer.clone(), o.clone());
    *hooked.before_get.lock() = Some(common::PutHook(
        name,
        Box::pin(async move {
            let path = manifest.strip_prefix("file://").expect("local").to_string();
            let len = std::fs::metadata(&path).expect("manifest").len() as usize;
            std::fs::write(&path, vec![0x5a; len]).expect("damage the manifest");
            put_at(&other, &o2, 3).await;
        }),
    ));
    common::sleep(std::time::Duration::from_millis(20)).await;
    let e = cleaner.remove_unreferenced_files(std::time::Duration::ZERO).await.expect_err("a damaged manifest");
    assert!(hooked.before_get.lock().is_none(), "the manifest was damaged during the cleanup's read");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    for f in &data_before {
        assert!(f.exists(), "{} was deleted while a manifest naming it could not be read", f.display());
    }
}

/// A retained snapshot another engine wrote over a dotdo snapshot that engine's expiry removed,
/// with a later dotdo commit on top (so the table's last-commit property names that one): its
/// state as of it is `NotFound` (its history is expired), as for an expired snapshot, not
/// `Corrupt`; the head reads as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_as_of_a_foreign_snapshot_whose_dotdo_base_was_expired_is_not_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 4).await;
    let o = ObjectId::new("o").expect("id");
    let first = put_at(&cold, &o, 1).await;
    foreign_commit(&cold).await;
    let foreign = cold.refresh().await.expect("table").metadata().current_snapshot_id().expect("head");
    put_at(&cold, &o, 2).await;
    let table = cold.refresh().await.expect("table");
    common::edit_metadata(table.metadata_location().expect("metadata"), |json| {
        let gone = |s: &serde_json::Value| s["snapshot-id"].as_i64() == Some(first);
        json["snapshots"].as_array_mut().expect("snapshots").retain(|s| !gone(s));
        json["snapshot-log"].as_array_mut().expect("log").retain(|s| !gone(s));
    });
    let fresh = open(dir.path(), 4).await;
    let e = fresh.load_state(&o, AsOf::Snapshot(foreign)).await.expect_err("history expired");
    assert_eq!(e.kind(), &ErrorKind::NotFound, "{e}");
    let st = fresh.load_state(&o, AsOf::Latest).await.expect("the head reads");
    assert_eq!(st.through, 2);
}

/// A store on `dir`'s table (one bucket, no cleanup minimum) over local files through a quiet
/// [`common::FaultyStore`], whose hooks a test sets.
async fn hooked_cleaner(dir: &std::path::Path) -> (Arc<common::FaultyStore>, IcebergColdStore) {
    let hooked = common::FaultyStore::quiet_local();
    let cleaner = IcebergColdStore::builder(dir.to_str().expect("utf-8"))
        .object_store(hooked.clone())
        .table(["m"], "changes")
        .settings(Settings { buckets: 1, min_cleanup_retention: std::time::Duration::ZERO, ..Default::default() })
        .build()
        .await
        .expect("cleaner");
    (hooked, cleaner)
}

/// On a local warehouse, the staging files object_store writes before renaming a file into place
/// (`<name>#<n>`), which a process killed mid-write leaves behind and object_store's listings
/// skip, are deleted by the cleanup once older than the retention (they stayed for good), in
/// `metadata/` and in partition directories, and kept while younger; a file of that shape in a
/// directory that is not the table's own layout is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_files_a_killed_write_left_are_cleaned_up() {
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = open(dir.path(), 4).await;
    let o = ObjectId::new("o1").expect("id");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 1, "k", "v", 1)]))
        .await
        .expect("append");
    let location = cold.refresh().await.expect("refresh").metadata().location().to_string();
    let root = std::path::PathBuf::from(location.strip_prefix("file://").expect("a local table"));
    let partition = std::fs::read_dir(root.join("data"))
        .expect("data dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().contains('=')))
        .expect("a partition directory");
    let staged = [partition.join("0-abc.parquet#1"), root.join("metadata/00009-x.metadata.json#12")];
    let foreign = root.join("data/0101/x.parquet#3");
    std::fs::create_dir_all(foreign.parent().expect("parent")).expect("foreign dir");
    for f in staged.iter().chain([&foreign]) {
        std::fs::write(f, b"half a file").expect("write a staging file");
    }
    // Younger than the retention: kept.
    let kept = cold.remove_unreferenced_files(Duration::from_secs(3600)).await.expect("cleanup");
    assert!(staged.iter().all(|f| f.exists()), "{kept:?}");
    assert!(kept.kept_recent >= 2, "{kept:?}");
    common::sleep(Duration::from_millis(20)).await;
    let clean = cold.remove_unreferenced_files(Duration::ZERO).await.expect("cleanup");
    for f in &staged {
        assert!(!f.exists(), "{} deleted: {clean:?}", f.display());
        let name = f.file_name().expect("name").to_string_lossy().to_string();
        assert!(clean.deleted.iter().any(|d| d.ends_with(&name)), "{name} reported: {clean:?}");
    }
    assert!(foreign.exists(), "not the table's layout: left alone");
    assert_eq!(cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").len(), 1);
}

/// A SQL catalog another engine created with the older "v0" schema (no `iceberg_type` column,
/// PyIceberg's `SqlCatalog` default) opens: dotdo adds the column (every open failed with "no
/// such column"), keeps the engine's own table listed as a table, and writes and reads its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sql_catalog_of_the_older_schema_is_opened_and_upgraded() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let c = rusqlite::Connection::open(dir.path().join("catalog.db")).expect("catalog db");
        c.execute_batch(
            "CREATE TABLE iceberg_tables (catalog_name VARCHAR(255) NOT NULL, table_namespace VARCHAR(255) NOT NULL, \
               table_name VARCHAR(255) NOT NULL, metadata_location VARCHAR(1000), \
               previous_metadata_location VARCHAR(1000), \
               PRIMARY KEY (catalog_name, table_namespace, table_name)); \
             CREATE TABLE iceberg_namespace_properties (catalog_name VARCHAR(255) NOT NULL, \
               namespace VARCHAR(255) NOT NULL, property_key VARCHAR(255), property_value VARCHAR(1000), \
               PRIMARY KEY (catalog_name, namespace, property_key)); \
             INSERT INTO iceberg_namespace_properties VALUES ('dotdo', 'other', 'exists', 'true'); \
             INSERT INTO iceberg_tables VALUES ('dotdo', 'other', 'theirs', '/nowhere/v1.metadata.json', NULL);",
        )
        .expect("a v0 catalog");
    }
    let cold = open(dir.path(), 4).await;
    let o = ObjectId::new("o1").expect("id");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 1, "k", "v", 1)]))
        .await
        .expect("append");
    assert_eq!(cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").len(), 1);
    let theirs = iceberg::TableIdent::from_strs(["other", "theirs"]).expect("ident");
    assert!(
        iceberg::Catalog::table_exists(&*cold.catalog(), &theirs).await.expect("table_exists"),
        "the other engine's row still reads as a table"
    );
    let c = rusqlite::Connection::open(dir.path().join("catalog.db")).expect("catalog db");
    let added: i64 = c
        .query_row("SELECT count(*) FROM pragma_table_info('iceberg_tables') WHERE name = 'iceberg_type'", [], |r| {
            r.get(0)
        })
        .expect("columns");
    assert_eq!(added, 1);
    drop(cold);
    let again = open(dir.path(), 4).await;
    assert_eq!(again.read_changes(&o, 0, AsOf::Latest).await.expect("read after reopen").len(), 1);
}

/// An in-memory SQL catalog URI is refused: each pooled connection would be an empty catalog of
/// its own (tables vanished once connections were closed idle or two calls overlapped).
#[tokio::test]
async fn an_in_memory_sql_catalog_uri_is_refused() {
    for uri in ["sqlite::memory:", "sqlite:/tmp/x.db?mode=memory&cache=shared", "sqlite:"] {
        let e = IcebergColdStore::builder("memory://m")
            .catalog(dotdo_iceberg::CatalogConfig::Sql { uri: uri.to_string() })
            .table(["m"], "changes")
            .build()
            .await
            .expect_err("an in-memory SQL catalog");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{uri}: {e}");
        assert!(e.to_string().contains("CatalogConfig::Memory"), "{e}");
    }
}

/// Two stores opening one new user table at once both open it: the SQL catalog reports the
/// loser's insert as an unexpected error, not "already exists" (it was a non-retryable `Backend`
/// for the loser, as it was for the change table before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_creating_one_user_table_at_once_both_open_it() {
    use arrow_array::{Array, Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf-8").to_string();
    let hooked = common::FaultyStore::quiet_local();
    let a = IcebergColdStore::builder(path.clone())
        .object_store(hooked.clone())
        .table(["m"], "changes")
        .build()
        .await
        .expect("store a");
    let b = IcebergColdStore::builder(path).table(["m"], "changes").build().await.expect("store b");
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
    let (reached_tx, reached_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    *hooked.before_put.lock() = Some(common::PutHook(
        ".metadata.json".into(),
        Box::pin(async move {
            let _ = reached_tx.send(());
            let _ = go_rx.await;
        }),
    ));
    let first = tokio::spawn({
        let schema = schema.clone();
        async move { a.arrow_table(&["u"], "t", schema).await }
    });
    reached_rx.await.expect("store a is creating the table");
    let second = b.arrow_table(&["u"], "t", schema).await.expect("store b creates it");
    go_tx.send(()).expect("release store a");
    let first = first.await.expect("task").expect("store a opens the table b created");
    // One table: what a appends, b reads.
    let batch = RecordBatch::try_new(first.schema(), vec![Arc::new(Int64Array::from(vec![7i64])) as Arc<dyn Array>])
        .expect("batch");
    first.append("s", 1, vec![batch]).await.expect("append through a");
    assert_eq!(second.last_batch("s").await.expect("through b"), 1);
    let rows: usize = second.read_all().await.expect("read through b").iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 1);
}

/// Expiry keeps the snapshot that was current when the window opens: a read as of any time in
/// the window is answered by it. (With three commits at 0, 10 and 50 minutes and 40 minutes
/// kept at minute 60, the commits at 0 and 10 were both expired, and a read as of minute 30,
/// inside the window, was `NotFound`.) Once a newer snapshot is itself older than the window,
/// the older one goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_travel_inside_the_expiry_window_survives_expiry() {
    use dotdo_core::{Clock, ManualClock, SystemClock};
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(SystemClock::new().now());
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .settings(Settings { buckets: 1, min_cleanup_retention: Duration::ZERO, ..Default::default() })
        .with_clock(Arc::new(clock.clone()))
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    let minute = Duration::from_secs(60);
    let t0 = clock.now();
    let mut ids = Vec::new();
    for (s, wait) in [(1, 10), (2, 40), (3, 10)] {
        let c = cold
            .append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, s, "k", "v", 1)]))
            .await
            .expect("append");
        ids.push(c.snapshot.expect("a snapshot"));
        clock.advance(minute * wait);
    }
    let report = cold.expire_snapshots(minute * 40, 1).await.expect("expire");
    assert_eq!(report.expired, [ids[0]], "only the commit at 0 is before the window's snapshot: {report:?}");
    let st = cold.load_state(&o, AsOf::Timestamp(t0.plus(minute * 30))).await.expect("inside the window");
    assert_eq!(st.through, 2, "{st:?}");
    // Minute 100: the commit at 50 is older than the window now, so the one at 10 goes.
    clock.advance(minute * 40);
    let report = cold.expire_snapshots(minute * 40, 1).await.expect("expire");
    assert_eq!(report.expired, [ids[1]], "{report:?}");
    let st = cold.load_state(&o, AsOf::Timestamp(t0.plus(minute * 61))).await.expect("inside the window");
    assert_eq!(st.through, 3, "{st:?}");
}

/// A store at `dir` of table `m.changes` through a custom catalog (iceberg's own commit
/// actions, as on REST catalogs) over the SQL catalog, with three commits of object `o`: the
/// store, the catalog, `o` and the three snapshot ids.
async fn three_commits_through_a_custom_catalog(
    dir: &std::path::Path,
) -> (IcebergColdStore, Arc<common::LossyCatalog>, ObjectId, Vec<i64>) {
    let uri = dotdo_iceberg::catalog::default_sqlite_uri(dir);
    let (build, slot) = common::switched_sql_catalog(uri, format!("file://{}", dir.display()));
    let cold = IcebergColdStore::builder(dir.to_str().expect("utf-8"))
        .catalog(dotdo_iceberg::CatalogConfig::Custom(build))
        .table(["m"], "changes")
        .settings(Settings { buckets: 1, ..Default::default() })
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    let mut ids = Vec::new();
    for s in 1..=3 {
        let c = cold
            .append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, s, "k", "v", 1)]))
            .await
            .expect("append");
        ids.push(c.snapshot.expect("a snapshot"));
    }
    common::sleep(std::time::Duration::from_millis(5)).await;
    let catalog = slot.lock().clone().expect("the catalog");
    (cold, catalog, o, ids)
}

/// Through a catalog other than the SQL one (here a custom catalog, which takes iceberg's
/// expire action), expiry commits on the table it planned on. Here, between the plan (on 1 ← 2
/// ← 3, keeping 3: expire 1 and 2) and the commit, another engine rolls main back to 2 and
/// appends on it. iceberg's commit reloaded the table and applied the plan's ids there,
/// unchecked: 2, the new head's dotdo base, was expired, and every later read of the table's
/// watermarks was `Corrupt`. Now the moved table is a conflict, and the expiry is planned
/// again on it (keeping 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_through_other_catalogs_plans_on_the_table_it_commits_to() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, catalog, o, ids) = three_commits_through_a_custom_catalog(dir.path()).await;
    // The plan's own load goes through; the rollback comes at the next load or commit.
    *catalog.foreign_change.lock() = Some((1, common::ForeignChange::RollBackAndAppend(ids[1])));
    let report = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("expire");
    assert!(catalog.foreign_change.lock().is_none(), "the other engine rolled back");
    assert!(!report.expired.contains(&ids[1]), "the new head's dotdo base stays: {report:?}");
    assert!(report.expired.contains(&ids[0]), "{report:?}");
    let fresh = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["m"], "changes")
        .build()
        .await
        .expect("reopen");
    assert_eq!(fresh.watermark(&o).await.expect("watermarks still known").through, 2, "rolled back to 2");
}

/// The same when the other engine, between the plan and the commit, tags a snapshot the plan
/// expires (and so writes a new metadata version) while the main branch stays: iceberg's
/// expire action requires only the main branch's head, so the commit went through and removed
/// the tag with its snapshot. Now the table is read again just before the commit, and a table
/// at another version is a conflict: planned again, the tagged snapshot stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_through_other_catalogs_keeps_a_tag_made_after_its_plan() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, catalog, _, ids) = three_commits_through_a_custom_catalog(dir.path()).await;
    *catalog.foreign_change.lock() = Some((1, common::ForeignChange::Tag(ids[0])));
    let report = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("expire");
    assert!(catalog.foreign_change.lock().is_none(), "the other engine tagged");
    assert!(!report.expired.contains(&ids[0]), "the tagged snapshot stays: {report:?}");
    let table = cold.refresh().await.expect("table");
    assert_eq!(table.metadata().snapshot_for_ref("t").map(|s| s.snapshot_id()), Some(ids[0]), "the tag stays");
}

/// Through a catalog other than the SQL one, expiry is iceberg's expire action, which applies a
/// ref's own retention on top of dotdo's plan. Here dotdo committed 1 ← 2 ← 3, another engine
/// appended 4 on top (no dotdo keys: 3 holds the watermarks) and set `main`'s snapshot age to
/// 1 ms: dotdo's plan expires 1 and 2, iceberg's action also expired 3, and the table's
/// watermarks were `Corrupt` for good. Now such a table is refused, nothing expired; so is one
/// whose tag is past its age limit (iceberg dropped the tag); settings under which the action
/// removes nothing more are let through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_through_other_catalogs_refuses_a_ref_with_its_own_retention() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, catalog, o, ids) = three_commits_through_a_custom_catalog(dir.path()).await;
    *catalog.foreign_change.lock() = Some((0, common::ForeignChange::RollBackAndAppend(ids[2])));
    let table = cold.refresh().await.expect("refresh");
    assert!(catalog.foreign_change.lock().is_none(), "the other engine appended");
    let table = if table.metadata().snapshots().count() == 4 { table } else { cold.refresh().await.expect("refresh") };
    assert_eq!(table.metadata().snapshots().count(), 4);
    let location = table.metadata_location().expect("metadata").to_string();
    common::edit_metadata(&location, |json| {
        json["refs"]["main"]["max-snapshot-age-ms"] = serde_json::json!(1);
        json["refs"]["main"]["min-snapshots-to-keep"] = serde_json::json!(1);
    });
    cold.refresh().await.expect("refresh");
    let e = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect_err("a ref with its own retention");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("max-snapshot-age-ms"), "{e}");
    let table = cold.refresh().await.expect("refresh");
    assert_eq!(table.metadata().snapshots().count(), 4, "nothing expired");
    assert_eq!(cold.watermark(&o).await.expect("watermarks known").through, 3);
    // The same for a tag with its own age limit, once main's setting is gone.
    common::edit_metadata(table.metadata_location().expect("metadata"), |json| {
        let main = json["refs"]["main"].as_object_mut().expect("main");
        main.remove("max-snapshot-age-ms");
        json["refs"]["t"] = serde_json::json!({"snapshot-id": ids[0], "type": "tag", "max-ref-age-ms": 1});
    });
    cold.refresh().await.expect("refresh");
    let e = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect_err("a tag with its own age limit");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("max-ref-age-ms"), "{e}");
    // Settings that remove nothing more are let through: main's snapshots are all younger than
    // a day, and the table's ref age limit has no other ref to drop. The expiry runs and keeps
    // 3 (the foreign head's dotdo base).
    common::edit_metadata(cold.refresh().await.expect("refresh").metadata_location().expect("metadata"), |json| {
        json["refs"].as_object_mut().expect("refs").remove("t");
        json["refs"]["main"]["max-snapshot-age-ms"] = serde_json::json!(86_400_000);
        json["properties"]["history.expire.max-ref-age-ms"] = serde_json::json!("1");
    });
    cold.refresh().await.expect("refresh");
    let report = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("expire");
    assert!(!report.expired.contains(&ids[2]), "{report:?}");
    assert_eq!(cold.watermark(&o).await.expect("watermarks known").through, 3);
    // And again after another commit, with the oldest snapshot left naming an expired parent
    // (iceberg keeps the id; it expires only snapshots the table lists): not refused for it.
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 4, "k", "v", 1)]))
        .await
        .expect("append");
    // (The append's new main ref carries no retention: set again.)
    common::edit_metadata(cold.refresh().await.expect("refresh").metadata_location().expect("metadata"), |json| {
        json["refs"]["main"]["max-snapshot-age-ms"] = serde_json::json!(86_400_000);
    });
    cold.refresh().await.expect("refresh");
    let again = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("expire again");
    assert!(again.expired.contains(&ids[2]), "{again:?}");
    assert_eq!(cold.watermark(&o).await.expect("watermarks known").through, 4);
}
