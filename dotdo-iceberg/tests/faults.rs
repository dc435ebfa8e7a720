//! Fault injection: a wrapper around a real local object store fails or delays puts, gets and
//! deletes at random, including "the write succeeded but the reply was lost". Every batch is
//! retried by the caller until acknowledged; afterwards every acknowledged batch must appear
//! exactly once, watermarks must be exact, and no snapshot may reference a missing file.
//!
//! `DOTDO_FAULTS` sets the minimum number of injected failures (default and floor 200; delays
//! come on top and are not counted); `DOTDO_FAULT_SEED` the seed (default: fixed).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use dotdo_core::{AsOf, Clock, ColdBatch, ColdSink, ErrorKind, FencingToken, ObjectChanges, ObjectId, Timestamp};
use dotdo_iceberg::IcebergColdStore;
use object_store::ObjectStore;

use common::{put, FaultyStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_batches_appear_exactly_once_under_injected_store_faults() {
    appends_under_faults(false).await;
}

/// The same with a catalog that also loses the replies of commits it applied (and refuses some):
/// dotdo's own SQL fast path never loses a commit's reply to store faults (the pointer swap is
/// a database update), so this is where a batch re-sent after a commit that landed must be found
/// by reading back, not committed twice. Commits go through iceberg's `Transaction` here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_batches_appear_exactly_once_under_store_and_catalog_faults() {
    appends_under_faults(true).await;
}

/// Rounds of one- and two-object batches through a faulty store (and, if `lossy_catalog`, a
/// catalog losing commit replies), each retried until acknowledged; then every acknowledged
/// batch is there exactly once and no snapshot names a missing file.
async fn appends_under_faults(lossy_catalog: bool) {
    let target = common::fault_target();
    let seed: u64 = std::env::var("DOTDO_FAULT_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x00d0_7d0f);
    println!("fault test: target {target} faults, seed {seed}, lossy catalog {lossy_catalog}");
    let dir = tempfile::tempdir().expect("tempdir");
    let local: Arc<dyn ObjectStore> = Arc::new(object_store::local::LocalFileSystem::new());
    let faulty = Arc::new(FaultyStore::new(local, seed, 0.08));
    faulty.set_enabled(false);
    let (mut catalog, mut lossy) = (None, None);
    if lossy_catalog {
        let uri = dotdo_iceberg::catalog::default_sqlite_uri(dir.path());
        let (build, slot) = common::lossy_sql_catalog(uri, format!("file://{}", dir.path().display()), seed);
        (catalog, lossy) = (Some(build), Some(slot));
    }
    let builder = || {
        let b = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .object_store(faulty.clone())
            .table(["faults"], "changes")
            // A clock nobody advances: retries must back off in real time, not on the store's
            // clock (they waited forever on a test's manual clock).
            .with_clock(Arc::new(dotdo_core::ManualClock::new(dotdo_core::testkit::KIT_EPOCH)))
            // Few internal attempts, so some failures reach the caller, who retries the same
            // batch. A checkpoint file every few commits, so checkpoint writes and reads see
            // faults too.
            .settings(dotdo_iceberg::Settings {
                max_commit_attempts: 2,
                watermark_checkpoint_objects: 2,
                ..Default::default()
            });
        match &catalog {
            Some(build) => b.catalog(dotdo_iceberg::CatalogConfig::Custom(build.clone())),
            None => b,
        }
    };
    let cold = builder().build().await.expect("open");
    faulty.set_enabled(true);

    let objects: Vec<ObjectId> = (0..4).map(|i| ObjectId::new(format!("obj-{i}")).expect("id")).collect();
    let mut next_seq: BTreeMap<ObjectId, u64> = objects.iter().map(|o| (o.clone(), 1)).collect();
    let mut acked = 0u64;
    let mut acked_records = 0u64;
    // Batches acknowledged after an attempt of theirs had failed: the caller re-sent them.
    let mut resent = 0u64;
    let mut errors: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut round = 0u64;
    let clock = dotdo_core::SystemClock::new();
    let t0 = clock.monotonic();
    while faulty.injected.load(Ordering::SeqCst) < target {
        round += 1;
        assert!(round < 20_000, "too many rounds without reaching {target} faults");
        // Batches of one or two objects, 1..=3 records each.
        let a = &objects[(round % 4) as usize];
        let b = &objects[((round * 7 + 1) % 4) as usize];
        let mut changes = Vec::new();
        for o in if a == b { vec![a] } else { vec![a, b] } {
            let start = next_seq[o];
            let n = 1 + round % 3;
            let recs = (start..start + n).map(|s| put(o, s, &format!("k{}", s % 5), &format!("v{s}"), 1)).collect();
            changes.push(ObjectChanges { object: o.clone(), token: FencingToken::new(1), records: recs });
        }
        let batch = ColdBatch { objects: changes };
        // Retry until acknowledged, as a pipeline would.
        let mut tries = 0;
        loop {
            tries += 1;
            assert!(tries < 200, "batch {round} never acknowledged");
            match cold.append(batch.clone()).await {
                Ok(c) => {
                    for oc in &batch.objects {
                        let last = oc.records.last().map_or(0, |r| r.seq);
                        assert_eq!(c.watermarks[&oc.object].through, last, "ack must cover the batch");
                        next_seq.insert(oc.object.clone(), last + 1);
                    }
                    acked += 1;
                    acked_records += batch.record_count() as u64;
                    resent += u64::from(tries > 1);
                    break;
                }
                Err(e) => {
                    assert!(
                        matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::AmbiguousOutcome | ErrorKind::Conflict),
                        "unexpected error kind under store faults: {e}"
                    );
                    *errors.entry(e.kind().name()).or_default() += 1;
                }
            }
        }
        // Reads under faults either succeed with a consistent answer or fail retryably.
        if round.is_multiple_of(5) {
            match cold.watermark(a).await {
                Ok(w) => assert_eq!(w.through, next_seq[a] - 1),
                Err(e) => assert!(e.is_retryable(), "watermark read error not retryable: {e}"),
            }
        }
    }
    println!("fault test: append phase took {:?}", clock.monotonic().saturating_sub(t0));
    println!(
        "fault test: {acked} batches acknowledged in {round} rounds; {} failures injected ({} lost replies), {} delays; caller-visible errors {errors:?}",
        faulty.injected.load(Ordering::SeqCst),
        faulty.lost_replies.load(Ordering::SeqCst),
        faulty.delays.load(Ordering::SeqCst)
    );
    let put_faults = faulty.put_faults.lock().clone();
    println!("fault test: failed file writes by kind (failures, lost replies): {put_faults:?}");
    // Writes of every file a commit makes failed, and had their reply lost, not only reads.
    for kind in ["data", "manifest", "metadata"] {
        let (failed, lost) = put_faults.get(kind).copied().unwrap_or_default();
        assert!(failed >= 5 && lost >= 2, "too few faults on {kind} file writes: {failed} failed, {lost} lost");
    }
    // The faults reached the caller (not all absorbed by internal retries), lost replies among them.
    assert!(errors.values().sum::<u64>() > 0, "no injected failure reached the caller");
    assert!(resent > 0, "no batch was re-sent after a failed attempt");
    assert!(faulty.lost_replies.load(Ordering::SeqCst) > 0, "no reply was lost");
    if let Some(slot) = &lossy {
        let cat = slot.lock().clone().expect("catalog built");
        let (lost, refused) = (cat.lost.load(Ordering::SeqCst), cat.failed.load(Ordering::SeqCst));
        println!("fault test: the catalog lost {lost} commit replies and refused {refused} commits; {resent} batches re-sent");
        // Commits that landed with their reply lost: each batch's re-send (inside the store or
        // by this caller) must find it, or the exact-sequence check below fails.
        assert!(lost >= 5, "too few commits landed with their reply lost: {lost}");
    }

    // A store that has cached nothing reads the watermarks (checkpoint files included) through
    // the faults: retryable errors, then the exact answers.
    faulty.reads.lock().clear();
    let mut fresh = None;
    for _ in 0..100 {
        match builder().build().await {
            Ok(s) => {
                fresh = Some(s);
                break;
            }
            Err(e) => assert!(e.is_retryable(), "opening under faults: {e}"),
        }
    }
    let fresh = fresh.expect("opened under faults");
    for o in &objects {
        let mut tries = 0;
        let through = loop {
            tries += 1;
            assert!(tries < 100, "{o}: watermark never read under faults");
            match fresh.watermark(o).await {
                Ok(w) => break w.through,
                Err(e) => assert!(e.is_retryable(), "watermark read under faults: {e}"),
            }
        };
        assert_eq!(through, next_seq[o] - 1, "{o}: watermark read under faults");
    }
    assert!(
        faulty.reads.lock().iter().any(|p| p.contains("/metadata/dotdo-watermarks-")),
        "no watermark checkpoint was read under faults"
    );

    faulty.set_enabled(false);
    for o in &objects {
        let want = next_seq[o] - 1;
        assert_eq!(cold.watermark(o).await.expect("watermark").through, want);
        let seqs: Vec<u64> = cold.read_changes(o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=want).collect::<Vec<_>>(), "{o}: rows lost or doubled");
    }

    // No snapshot points at a missing file: every manifest list, manifest and data file exists
    // (checked for every snapshot), and every 20th snapshot and the last read back.
    let table = cold.refresh().await.expect("refresh");
    let checked = assert_no_missing_files(&cold, &faulty, false).await;
    let n_snaps = table.metadata().snapshots().len();
    for (i, s) in table.metadata().snapshots().enumerate() {
        if i.is_multiple_of(20) || i + 1 == n_snaps {
            for o in &objects {
                cold.load_state(o, AsOf::Snapshot(s.snapshot_id())).await.expect("snapshots read back");
            }
        }
    }
    assert!(checked > 0);
    assert_eq!(cold.snapshots().await.expect("snapshots").len() as u64, acked, "one snapshot per acknowledged batch");
    // Reads keep one row per sequence number, so the exact-sequence check above cannot see a row
    // stored twice (a data file whose write reply was lost, written again and listed twice):
    // the head snapshot's live files hold exactly the acknowledged rows.
    assert_eq!(common::live_rows(&cold).await, acked_records, "rows stored twice or lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_committing_concurrently_both_succeed_without_loss_or_duplication() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf-8").to_string();
    let recorded = FaultyStore::quiet_local();
    let open =
        || IcebergColdStore::builder(path.clone()).object_store(recorded.clone()).table(["conc"], "changes").build();
    let a = open().await.expect("writer a");
    let b = open().await.expect("writer b");
    // Whichever writer commits first loses its swap for certain: a third one commits between
    // its metadata file and its swap (the other losses depend on the interleaving).
    let third = open().await.expect("writer c");
    let hook = ObjectId::new("hook").expect("id");
    let first = ColdBatch::single(hook.clone(), FencingToken::new(1), vec![put(&hook, 1, "k", "v", 1)]);
    *recorded.before_put.lock() = Some(common::PutHook(
        ".metadata.json".into(),
        Box::pin(async move {
            third.append(first).await.expect("the third writer commits first");
        }),
    ));
    recorded.puts.lock().clear();
    let shared = ObjectId::new("shared").expect("id");
    let run = |cold: IcebergColdStore, own: ObjectId| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let (mut written, mut skipped) = (0u64, 0u64);
            for i in 1..=15u64 {
                let batch = ColdBatch {
                    objects: vec![
                        ObjectChanges {
                            object: own.clone(),
                            token: FencingToken::new(1),
                            records: vec![put(&own, i, "k", "v", 1)],
                        },
                        // Both writers send the same records of the shared object (a replay race).
                        ObjectChanges {
                            object: shared.clone(),
                            token: FencingToken::new(1),
                            records: vec![put(&shared, i, &format!("k{i}"), "v", 1)],
                        },
                    ],
                };
                let c = cold.append(batch).await.expect("append under contention");
                written += c.records_written;
                skipped += c.records_skipped;
            }
            (written, skipped)
        })
    };
    let ta = run(a.clone(), ObjectId::new("only-a").expect("id"));
    let tb = run(b.clone(), ObjectId::new("only-b").expect("id"));
    let (wa, sa) = ta.await.expect("a");
    let (wb, sb) = tb.await.expect("b");
    // Each shared record went in once, by whichever writer committed it first, and the other
    // writer's copy was skipped as a replay: 15 + 15 own + 15 shared written, 15 skipped.
    assert_eq!((wa + wb, sa + sb), (45, 15), "a wrote {wa} skipped {sa}, b wrote {wb} skipped {sb}");
    // 31 commits (30 batches and the third writer's); every lost swap wrote one metadata file more.
    let metadata_files = recorded.puts.lock().iter().filter(|p| p.ends_with(".metadata.json")).count();
    assert!(metadata_files > 31, "no swap was lost: {metadata_files} metadata files written for 31 commits");
    assert_eq!(a.refresh().await.expect("refresh").metadata().snapshots().count(), 31, "one snapshot per commit");
    for (o, n) in [("only-a", 15u64), ("only-b", 15), ("shared", 15), ("hook", 1)] {
        let o = ObjectId::new(o).expect("id");
        let seqs: Vec<u64> = a.read_changes(&o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "{o}");
        assert_eq!(b.watermark(&o).await.expect("wm").through, n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_catalog_commits_swap_the_pointer_without_rereading_metadata_and_a_lost_race_leaves_no_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf-8").to_string();
    let recorded = FaultyStore::quiet_local();
    let open =
        || IcebergColdStore::builder(path.clone()).object_store(recorded.clone()).table(["swap"], "changes").build();
    let a = open().await.expect("writer a");
    let b = open().await.expect("writer b");
    let obj = ObjectId::new("obj").expect("id");
    let batch = |seq: u64| ColdBatch {
        objects: vec![ObjectChanges {
            object: obj.clone(),
            token: FencingToken::new(1),
            records: vec![put(&obj, seq, &format!("k{seq}"), "v", 1)],
        }],
    };
    a.append(batch(1)).await.expect("first append");

    // Appends on a current table read no table metadata: the commit applies to the table in
    // hand and moves the catalog pointer with a compare-and-swap.
    recorded.reads.lock().clear();
    for seq in 2..=4 {
        assert_eq!(a.append(batch(seq)).await.expect("append").records_written, 1);
    }
    let reads = recorded.reads.lock().clone();
    let metadata_reads: Vec<&String> = reads.iter().filter(|p| p.ends_with(".metadata.json")).collect();
    assert!(metadata_reads.is_empty(), "appends re-read table metadata: {metadata_reads:?}");
    // Nor the manifest list of the snapshot before: this store wrote it.
    let list_reads: Vec<&String> = reads.iter().filter(|p| p.contains("/metadata/snap-")).collect();
    assert!(list_reads.is_empty(), "appends re-read manifest lists: {list_reads:?}");
    // The snapshot is the one iceberg's fast append makes: operation append, the added and
    // total metrics, the parent's manifests plus one new one.
    let t = a.table();
    let head = t.metadata().current_snapshot().expect("head").clone();
    assert_eq!(head.summary().operation, iceberg::spec::Operation::Append);
    let p = &head.summary().additional_properties;
    for (k, v) in [("added-records", "1"), ("added-data-files", "1"), ("total-records", "4"), ("total-data-files", "4")]
    {
        assert_eq!(p.get(k).map(String::as_str), Some(v), "{k} in {p:?}");
    }
    assert_eq!(p.get("total-delete-files").map(String::as_str), Some("0"), "{p:?}");
    let listed = t.manifest_list_reader(&head).load().await.expect("manifest list");
    assert_eq!(listed.entries().len(), 4, "one manifest per append");
    assert!(listed.entries().iter().all(|m| m.sequence_number > 0 && m.min_sequence_number > 0));

    // b still holds the table as it was before any append: its swap from that version loses,
    // it reloads and commits on the current table. The metadata file of the lost attempt is
    // deleted.
    recorded.puts.lock().clear();
    let other = ObjectId::new("other").expect("id");
    let c = b
        .append(ColdBatch {
            objects: vec![ObjectChanges {
                object: other.clone(),
                token: FencingToken::new(1),
                records: vec![put(&other, 1, "k", "v", 1)],
            }],
        })
        .await
        .expect("append from a stale handle");
    assert_eq!((c.records_written, c.records_skipped), (1, 0));
    let written: Vec<String> = recorded.puts.lock().iter().filter(|p| p.ends_with(".metadata.json")).cloned().collect();
    assert_eq!(written.len(), 2, "b lost its first swap and committed with a second metadata file: {written:?}");
    let seqs: Vec<u64> = a.read_changes(&obj, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert_eq!(a.read_changes(&other, 0, AsOf::Latest).await.expect("read").len(), 1);
    // One metadata file per table version: creation, the table-property commit if any, and one
    // per append; the lost attempt's file is gone.
    let versions = common::files_ending_with(dir.path(), ".metadata.json").len();
    let history = a.table().metadata().metadata_log().len() + 1;
    assert_eq!(versions, history, "metadata files {:?}", common::files_ending_with(dir.path(), ".metadata.json"));
    assert_eq!(a.table().metadata().snapshots().count(), 5);
    // Every manifest and manifest list on disk is referenced: the lost attempt's are gone.
    let t = a.table();
    let mut referenced = std::collections::BTreeSet::new();
    for s in t.metadata().snapshots() {
        referenced.insert(s.manifest_list().trim_start_matches("file://").to_string());
        for m in t.manifest_list_reader(s).load().await.expect("list").entries() {
            referenced.insert(m.manifest_path.trim_start_matches("file://").to_string());
        }
    }
    let meta_dir = dir.path().join("swap/changes/metadata");
    let on_disk: std::collections::BTreeSet<String> =
        common::files_ending_with(&meta_dir, ".avro").into_iter().map(|p| p.to_string_lossy().into_owned()).collect();
    assert_eq!(on_disk, referenced, "unreferenced or missing manifest files");
}

/// While another process holds the SQL catalog's write lock past the busy timeout, a commit
/// fails with a retryable `Unavailable` (the pointer was read back: still the base), for the
/// change log and for user tables alike; once the lock is gone the same batch commits once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_sql_catalog_is_a_retryable_unavailable_error_and_nothing_is_committed_twice() {
    use arrow_array::{Int32Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["locked"], "changes")
        .settings(dotdo_iceberg::Settings { max_commit_attempts: 1, ..Default::default() })
        .build()
        .await
        .expect("open");
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false)]));
    let user = cold.arrow_table(&["locked"], "events", schema.clone()).await.expect("user table");
    let rows = RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from(vec![1, 2, 3]))]).expect("batch");
    let obj = ObjectId::new("obj").expect("id");
    let batch = ColdBatch {
        objects: vec![ObjectChanges {
            object: obj.clone(),
            token: FencingToken::new(1),
            records: vec![put(&obj, 1, "k", "v", 1)],
        }],
    };

    // Another process takes the catalog database's write lock and keeps it.
    let lock = rusqlite::Connection::open(dir.path().join("catalog.db")).expect("open catalog db");
    lock.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
    let e = cold.append(batch.clone()).await.expect_err("the catalog is locked");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable(), "{e}");
    let e = user.append("s", 1, vec![rows.clone()]).await.expect_err("the catalog is locked");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    lock.execute_batch("ROLLBACK").expect("release the lock");

    let c = cold.append(batch).await.expect("append once the lock is gone");
    assert_eq!(c.records_written, 1);
    assert_eq!(cold.read_changes(&obj, 0, AsOf::Latest).await.expect("read").len(), 1);
    assert_eq!(user.append("s", 1, vec![rows]).await.expect("user append").rows, 3);
    assert_eq!(cold.table().metadata().snapshots().count(), 1, "the failed attempt left no snapshot");
}

/// The watermark checkpoint of an append attempt that lost to another writer's commit is
/// deleted (nothing names it): after one lost attempt and the one that landed, the table holds
/// one checkpoint per landed commit. It stayed until a cleanup (tens of MB per lost attempt at a
/// million objects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_of_a_lost_attempt_is_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hooked = FaultyStore::quiet_local();
    let settings = || dotdo_iceberg::Settings { watermark_checkpoint_objects: 0, ..Default::default() };
    let open = |store: Option<Arc<FaultyStore>>| {
        let b =
            IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).table(["m"], "changes").settings(settings());
        let b = match store {
            Some(s) => b.object_store(s),
            None => b,
        };
        b.build()
    };
    let cold = open(Some(hooked.clone())).await.expect("open");
    let other = open(None).await.expect("another writer");
    let (o, p) = (ObjectId::new("o").expect("id"), ObjectId::new("p").expect("id"));
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "v", 1)]))
        .await
        .expect("first");
    // Just before this append's metadata file, the other writer commits: the attempt loses.
    let theirs = ColdBatch::single(p.clone(), FencingToken::new(1), vec![put(&p, 1, "k", "v", 1)]);
    *hooked.before_put.lock() = Some(common::PutHook(
        ".metadata.json".to_string(),
        Box::pin(async move {
            other.append(theirs).await.expect("the other writer commits first");
        }),
    ));
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 2, "k", "w", 1)]))
        .await
        .expect("lands");
    assert!(hooked.before_put.lock().is_none(), "the other writer ran");
    let commits = cold.refresh().await.expect("table").metadata().snapshots().count();
    assert_eq!(commits, 3);
    let checkpoints = common::files_ending_with(dir.path(), ".json")
        .into_iter()
        .filter(|f| f.file_name().is_some_and(|n| n.to_string_lossy().starts_with("dotdo-watermarks-")))
        .count();
    assert_eq!(checkpoints, commits, "one checkpoint per landed commit");
}

/// A user-table append that lands while `add_column` commits (between its load and its pointer
/// swap) makes the schema change a conflict; `add_column` reloads and adds the column on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_column_retries_over_an_append_that_landed_first() {
    use arrow_array::{Int32Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let hooked = FaultyStore::quiet_local();
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .object_store(hooked.clone())
        .table(["hook"], "changes")
        .build()
        .await
        .expect("open");
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false)]));
    let t = cold.arrow_table(&["hook"], "events", schema.clone()).await.expect("user table");
    let rows = |v: Vec<i32>| RecordBatch::try_new(schema.clone(), vec![Arc::new(Int32Array::from(v))]).expect("batch");
    t.append("s", 1, vec![rows(vec![1])]).await.expect("first append");
    // The next metadata file written is add_column's: just before it, another writer appends.
    let other = t.clone();
    let concurrent = rows(vec![2, 3]);
    *hooked.before_put.lock() = Some(common::PutHook(
        ".metadata.json".to_string(),
        Box::pin(async move {
            other.append("s", 2, vec![concurrent]).await.expect("concurrent append");
        }),
    ));
    let t = t.add_column("note", DataType::Utf8).await.expect("add_column over a concurrent append");
    assert!(hooked.before_put.lock().is_none(), "the concurrent append ran");
    assert_eq!(t.last_batch("s").await.expect("mark"), 2, "the concurrent append is kept");
    let md = cold.catalog().load_table(&iceberg::TableIdent::from_strs(["hook", "events"]).expect("ident")).await;
    let md = md.expect("load").metadata().clone();
    assert!(md.current_schema().field_by_name("note").is_some());
    assert_eq!(md.snapshots().count(), 2, "both appends are in the table");
}

/// An append whose first attempt loses to its table being dropped and created again under the
/// same name (with another bucket count) writes new files for the new table: the files it wrote
/// for the old one carry the old table's bucket values (spec ids start over at 0 in the new
/// table, so the spec check alone let them be reused), and reads of the new table, pruned by
/// bucket, missed their rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_never_reused_across_a_table_dropped_and_created_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let warehouse = dir.path().to_str().expect("utf-8").to_string();
    let hooked = FaultyStore::quiet_local();
    let two = dotdo_iceberg::Settings { buckets: 2, ..Default::default() };
    let cold = IcebergColdStore::builder(&warehouse)
        .object_store(hooked.clone())
        .table(["re"], "changes")
        .settings(two)
        .build()
        .await
        .expect("open");
    let objects: Vec<ObjectId> = (0..8).map(|i| ObjectId::new(format!("obj-{i}")).expect("id")).collect();
    let batch = common::one_put_each(&objects, 1);
    let (catalog, wh) = (cold.catalog(), warehouse.clone());
    *hooked.before_put.lock() = Some(common::PutHook(
        ".metadata.json".to_string(),
        Box::pin(async move {
            let ident = iceberg::TableIdent::from_strs(["re", "changes"]).expect("ident");
            catalog.drop_table(&ident).await.expect("drop");
            let four = dotdo_iceberg::Settings { buckets: 4, ..Default::default() };
            IcebergColdStore::builder(&wh)
                .table(["re"], "changes")
                .settings(four)
                .build()
                .await
                .expect("created again");
        }),
    ));
    cold.append(batch).await.expect("lands in the table created again");
    assert!(hooked.before_put.lock().is_none(), "the table was dropped and created again");
    let fresh = IcebergColdStore::builder(&warehouse).table(["re"], "changes").build().await.expect("reopen");
    for o in &objects {
        let st = fresh.load_state(o, AsOf::Latest).await.expect("state");
        assert_eq!(st.entries.len(), 1, "{o}: {st:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_rest_catalog_is_a_retryable_unavailable_error() {
    let (_refusing, port) = dotdo_core::testkit::refused_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let err = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .catalog(dotdo_iceberg::CatalogConfig::Rest {
            uri: format!("http://127.0.0.1:{port}"),
            warehouse: None,
            properties: [("token".to_string(), "secret-token".to_string())].into(),
        })
        .build()
        .await
        .expect_err("nothing listens on the port");
    assert_eq!(err.kind(), &ErrorKind::Unavailable, "{err}");
    assert!(err.is_retryable());
    let cfg = dotdo_iceberg::CatalogConfig::Rest {
        uri: "http://x".into(),
        warehouse: None,
        properties: [("token".to_string(), "secret-token".to_string())].into(),
    };
    assert!(!format!("{cfg:?}").contains("secret-token"), "secrets are redacted in Debug");
}

/// A REST catalog URI that can never work is a non-retryable `InvalidInput` at open: an
/// `https://` URL for a server that speaks no TLS (the TLS client refuses its answer; it was a
/// retryable `Unavailable`, so the open was retried for good), an empty URI (an unset
/// environment variable; it was `Corrupt`), another scheme. A trailing `/` is dropped: requests
/// go to `/v1/…`, not `//v1/…` (which servers answer 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_catalog_uris_that_can_never_work_are_configuration_errors() {
    use std::io::{Read, Write};
    let plain = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = plain.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in plain.incoming() {
            let Ok(mut conn) = conn else { return };
            // A plain-HTTP server's answer to a TLS hello.
            let _ = conn.read(&mut [0u8; 1024]);
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    let open = |uri: String| async move {
        let dir = tempfile::tempdir().expect("tempdir");
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .catalog(dotdo_iceberg::CatalogConfig::Rest { uri, warehouse: None, properties: Default::default() })
            .build()
            .await
    };
    for uri in [format!("https://127.0.0.1:{port}"), String::new(), " ".into(), "ftp://catalog.example".into()] {
        let e = open(uri.clone()).await.expect_err("refused");
        assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::InvalidInput, false), "{uri:?}: {e}");
    }
    let (port, seen) = answering("404 Not Found", "");
    open(format!("http://127.0.0.1:{port}/")).await.expect_err("nothing is served");
    let first = seen.lock().first().cloned().unwrap_or_default();
    assert!(first.starts_with("GET /v1/config"), "the server's own paths: {first:?}");
}

/// A one-thread HTTP/1.1 server on loopback that answers every request with `status` and
/// `body` and records each request line. It reads each request whole (headers and
/// `content-length` body) before answering, so the client sees the answer, not a reset.
fn answering(status: &'static str, body: &'static str) -> (u16, std::sync::Arc<parking_lot::Mutex<Vec<String>>>) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let Some((line, _, _)) = dotdo_core::testkit::read_http_request(&conn) else { continue };
            log.lock().push(line);
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(answer.as_bytes());
        }
    });
    (port, seen)
}

/// A REST catalog whose OAuth token endpoint is busy, refuses the credential or answers a 200
/// that is no token: `Unavailable` (retryable) for the first, non-retryable `Backend` for the
/// others, never `Corrupt`, and neither the credential nor the body (which may hold a token)
/// is in the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_token_endpoint_failures_are_classified_and_keep_secrets() {
    let cases = [
        ("503 Service Unavailable", "<html>overloaded s3cr3t-body</html>", ErrorKind::Unavailable),
        (
            "503 Service Unavailable",
            r#"{"error":{"message":"down","type":"ServiceUnavailableException","code":503}}"#,
            ErrorKind::Unavailable,
        ),
        ("429 Too Many Requests", "", ErrorKind::Unavailable),
        ("401 Unauthorized", r#"{"error":"invalid_client","error_description":"s3cr3t-body"}"#, ErrorKind::Backend),
        ("400 Bad Request", r#"{"error":"invalid_grant"}"#, ErrorKind::Backend),
        ("200 OK", r#"{"access_token":"s3cr3t-body"}"#, ErrorKind::Backend),
    ];
    for (status, body, kind) in cases {
        let (port, seen) = answering(status, body);
        let dir = tempfile::tempdir().expect("tempdir");
        let err = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .catalog(dotdo_iceberg::CatalogConfig::Rest {
                uri: format!("http://127.0.0.1:{port}"),
                warehouse: None,
                properties: [("credential".to_string(), "client:s3cr3t-credential".to_string())].into(),
            })
            .build()
            .await
            .expect_err("the token endpoint never issues a token");
        assert!(
            seen.lock().first().is_some_and(|l| l.starts_with("POST /v1/oauth/tokens")),
            "the first request asks for a token: {:?}",
            seen.lock()
        );
        assert_eq!(err.kind(), &kind, "{status} {body}: {err}");
        assert_eq!(err.is_retryable(), kind == ErrorKind::Unavailable, "{status}: {err}");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("s3cr3t"), "{status}: a secret leaked: {shown}");
    }
}

/// The table and the location of the first data file of its current snapshot.
async fn first_data_file(cold: &IcebergColdStore) -> (iceberg::table::Table, String) {
    let table = cold.refresh().await.expect("refresh");
    let snap = table.metadata().current_snapshot().expect("snapshot").clone();
    let list = table.manifest_list_reader(&snap).load().await.expect("list");
    let m = list.entries()[0].load_manifest(table.file_io()).await.expect("manifest");
    let file = m.entries()[0].data_file().file_path().to_string();
    (table, file)
}

/// A store on a new local warehouse at `dir` (default settings) whose object `o` has puts of key
/// `k` at sequence numbers 1 to `n`, one commit each.
async fn store_with_puts(dir: &std::path::Path, n: u64) -> (IcebergColdStore, ObjectId) {
    let cold = IcebergColdStore::builder(dir.to_str().expect("utf-8")).build().await.expect("open");
    let o = ObjectId::new("o").expect("id");
    puts(&cold, &o, n).await;
    (cold, o)
}

/// Puts of `o`'s key `k` at sequence numbers 1 to `n` (token 1), one commit each.
async fn puts(cold: &IcebergColdStore, o: &ObjectId, n: u64) {
    for seq in 1..=n {
        cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(o, seq, "k", "v", 1)]))
            .await
            .expect("append");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_data_file_is_corrupt_and_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, o) = store_with_puts(dir.path(), 1).await;
    // Delete the data file behind the table's back.
    let (table, file) = first_data_file(&cold).await;
    std::fs::remove_file(file.strip_prefix("file://").expect("local")).expect("remove");
    let fresh = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("reopen");
    let err = fresh.load_state(&o, AsOf::Latest).await.expect_err("missing file");
    assert_eq!(err.kind(), &ErrorKind::Corrupt, "{err}");
    let name = file.rsplit('/').next().expect("name");
    assert!(err.to_string().contains(name), "error names the file: {err}");
    // A damaged metadata file is Corrupt too.
    let meta = table.metadata_location().expect("metadata").to_string();
    std::fs::write(meta.strip_prefix("file://").expect("local"), b"{ not json").expect("damage");
    let err = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect_err("damaged");
    assert_eq!(err.kind(), &ErrorKind::Corrupt, "{err}");
    let name = meta.rsplit('/').next().expect("name");
    assert!(err.to_string().contains(name), "error names the metadata file: {err}");
    // And so does a reload of a store that was open.
    let err = fresh.refresh().await.expect_err("damaged");
    assert_eq!(err.kind(), &ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains(name), "error names the metadata file: {err}");
}

/// An append on a table whose head's manifest list is damaged fails at once, `Corrupt` naming
/// the file, and says it did not land: preparing the commit (reading the parent's manifest list,
/// writing the new one) failed before anything was swapped, yet was taken for an unknown outcome
/// and read back and retried 16 times over about ten seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_cannot_be_prepared_did_not_land_and_is_not_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, o) = store_with_puts(dir.path(), 1).await;
    let (table, _) = first_data_file(&cold).await;
    let list = table.metadata().current_snapshot().expect("head").manifest_list().to_string();
    std::fs::write(list.strip_prefix("file://").expect("local"), b"not an avro file").expect("damage");
    let fresh = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("reopen");
    let e = fresh
        .append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 2, "k", "w", 1)]))
        .await
        .expect_err("the parent's manifest list is damaged");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    let name = list.rsplit('/').next().expect("name");
    assert!(e.to_string().contains(name), "names the file: {e}");
    assert!(e.to_string().contains("did not land"), "not an unknown outcome retried: {e}");
}

/// Table metadata whose last sequence number is `i64::MAX` (damaged, or another engine's) leaves
/// no number for the next snapshot: an append is `Corrupt` naming the metadata and did not land
/// (iceberg adds one unchecked: a panic in a debug build, a wrapped number in release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_with_no_sequence_number_left_is_corrupt_not_a_panic() {
    use arrow_array::{Int32Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, o) = store_with_puts(dir.path(), 2).await;
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false)]));
    let rows = |v: i32| RecordBatch::try_new(schema.clone(), vec![Arc::new(Int32Array::from(vec![v]))]).expect("batch");
    let user = cold.arrow_table(&["dotdo"], "users", schema.clone()).await.expect("user table");
    user.append("s", 1, vec![rows(1)]).await.expect("user append");
    let exhaust = |location: String| {
        common::edit_metadata(&location, |json| json["last-sequence-number"] = serde_json::json!(i64::MAX));
    };
    let (table, _) = first_data_file(&cold).await;
    exhaust(table.metadata_location().expect("metadata").to_string());
    let user_table = cold.catalog().load_table(user.ident()).await.expect("load");
    exhaust(user_table.metadata_location().expect("metadata").to_string());
    let fresh = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("reopen");
    let data_files = || common::files_ending_with(dir.path(), ".parquet").len();
    let before = data_files();
    let e = fresh
        .append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 3, "k", "w", 1)]))
        .await
        .expect_err("no sequence number left");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("last-sequence-number"), "{e}");
    assert!(e.to_string().contains("did not land"), "{e}");
    let e = fresh.compact(dotdo_iceberg::CompactOptions::default()).await.expect_err("a compaction too");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    // A user table: the same, at once (it was retried as an unknown outcome).
    let user = fresh.arrow_table(&["dotdo"], "users", schema.clone()).await.expect("user table");
    let e = user.append("s", 2, vec![rows(2)]).await.expect_err("no sequence number left");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.message().starts_with("the commit did not land"), "given up at once, as not landed: {e}");
    assert_eq!(data_files(), before, "the data files the failed commits would have named are deleted");
}

/// The same through iceberg's own commit path (a catalog other than the SQL one): `Corrupt`,
/// did not land, no panic (iceberg numbered the snapshot last-sequence-number + 1, unchecked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sequence_number_left_on_iceberg_s_own_commit_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .catalog(dotdo_iceberg::CatalogConfig::Memory)
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "v", 1)]))
        .await
        .expect("append");
    let (table, _) = first_data_file(&cold).await;
    common::edit_metadata(table.metadata_location().expect("metadata"), |json| {
        json["last-sequence-number"] = serde_json::json!(i64::MAX)
    });
    cold.refresh().await.expect("reload the damaged metadata");
    let e = cold
        .append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 2, "k", "w", 1)]))
        .await
        .expect_err("no sequence number left");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("did not land"), "{e}");
}

/// Point the SQL catalog of the warehouse at `dir` at `location` for table `name`.
fn repoint(dir: &std::path::Path, name: &str, location: &str) {
    let c = rusqlite::Connection::open(dir.join("catalog.db")).expect("catalog");
    let moved = c
        .execute("UPDATE iceberg_tables SET metadata_location = ?1 WHERE table_name = ?2", [location, name])
        .expect("move the pointer");
    assert_eq!(moved, 1);
}

/// A metadata file numbered `i32::MAX` (damaged, or another engine's) leaves no number for the
/// next one: an append is `Corrupt` naming the metadata and did not land, and no metadata file
/// of a wrapped version is written (iceberg adds one unchecked: a panic in a debug build; in
/// release the catalog moved to `-2147483648-….metadata.json`, a name no reader parses, and
/// every later commit failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_file_at_the_last_version_is_corrupt_not_a_wrap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, o) = store_with_puts(dir.path(), 2).await;
    let (table, _) = first_data_file(&cold).await;
    let current = table.metadata_location().expect("metadata").to_string();
    let last = format!("{}/metadata/{}-{}.metadata.json", table.metadata().location(), i32::MAX, uuid_like());
    std::fs::copy(current.strip_prefix("file://").expect("local"), last.strip_prefix("file://").expect("local"))
        .expect("copy");
    repoint(dir.path(), "changes", &last);
    cold.refresh().await.expect("the metadata reads");
    let e = cold
        .append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 3, "k", "w", 1)]))
        .await
        .expect_err("no version left");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains(&format!("version {}", i32::MAX)), "{e}");
    assert!(e.to_string().contains("did not land"), "{e}");
    // A commit without a snapshot (an expiry through the store's own commit) too.
    let e = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect_err("no version left");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    let wrapped = common::files_ending_with(dir.path(), ".metadata.json")
        .into_iter()
        .filter(|f| f.to_string_lossy().contains("/-"))
        .collect::<Vec<_>>();
    assert!(wrapped.is_empty(), "metadata of a wrapped version: {wrapped:?}");
    assert_eq!(cold.refresh().await.expect("refresh").metadata_location(), Some(last.as_str()), "nothing moved");
    // A commit through iceberg's own transaction (a user table's new column) too.
    use arrow_schema::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false)]));
    let user = cold.arrow_table(&["dotdo"], "users", schema).await.expect("user table");
    let current = cold.catalog().load_table(user.ident()).await.expect("load");
    let current = current.metadata_location().expect("metadata").to_string();
    let last = format!(
        "{}/metadata/{}-{}.metadata.json",
        current.rsplit_once("/metadata/").expect("dir").0,
        i32::MAX,
        uuid_like()
    );
    std::fs::copy(current.strip_prefix("file://").expect("local"), last.strip_prefix("file://").expect("local"))
        .expect("copy");
    repoint(dir.path(), "users", &last);
    let e = user.add_column("note", DataType::Utf8).await.expect_err("no version left");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains(&format!("version {}", i32::MAX)), "{e}");
    let wrapped = common::files_ending_with(dir.path(), ".metadata.json")
        .into_iter()
        .filter(|f| f.to_string_lossy().contains("/-"))
        .collect::<Vec<_>>();
    assert!(wrapped.is_empty(), "metadata of a wrapped version: {wrapped:?}");
}

/// A random-looking uuid for a metadata file name.
fn uuid_like() -> String {
    "0b7c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c3".to_string()
}

/// A metadata-log timestamp of `i64::MIN` (damaged or foreign metadata) is `Corrupt` when the
/// table is loaded, naming the table's metadata, not a panic (iceberg subtracts the log's
/// timestamps unchecked as it loads a metadata file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_log_timestamp_that_overflows_is_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, _o) = store_with_puts(dir.path(), 2).await;
    let (table, _) = first_data_file(&cold).await;
    common::edit_metadata(table.metadata_location().expect("metadata"), |json| {
        let log = json["metadata-log"].as_array_mut().expect("a metadata log");
        let last = log.last_mut().expect("an entry");
        last["timestamp-ms"] = serde_json::json!(i64::MIN);
    });
    let e = cold.refresh().await.expect_err("damaged metadata");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("metadata file of table"), "{e}");
    let e = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect_err("reopen");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
}

/// An older table version named in the metadata log whose own log is damaged (a timestamp of
/// `i64::MIN`, which iceberg's reader subtracts unchecked) does not take a file cleanup down: it
/// is skipped as unreadable (as a missing one is), and nothing live is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_older_metadata_version_does_not_panic_a_cleanup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, o) = store_with_puts(dir.path(), 3).await;
    let (table, _) = first_data_file(&cold).await;
    let older = table.metadata().metadata_log().last().expect("an older version").metadata_file.clone();
    common::edit_metadata(&older, |json| {
        let log = json["metadata-log"].as_array_mut().expect("the older version's log");
        log.last_mut().expect("an entry")["timestamp-ms"] = serde_json::json!(i64::MIN);
    });
    cold.remove_unreferenced_files(std::time::Duration::from_secs(3600)).await.expect("cleanup");
    let state = cold.load_state(&o, AsOf::Latest).await.expect("state after the cleanup");
    assert_eq!((state.through, state.entries.len()), (3, 1));
}

/// A user table whose schema id is `i32::MAX` (damaged, or another engine's) leaves no id for a
/// widened schema: `Corrupt`, nothing committed (iceberg adds one to the highest id unchecked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widening_a_table_at_the_last_schema_id_is_corrupt_not_a_panic() {
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("open");
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false)]));
    let user = cold.arrow_table(&["dotdo"], "users", schema).await.expect("user table");
    let table = cold.catalog().load_table(user.ident()).await.expect("load");
    let location = table.metadata_location().expect("metadata").to_string();
    common::edit_metadata(&location, |json| {
        json["schemas"][0]["schema-id"] = serde_json::json!(i32::MAX);
        json["current-schema-id"] = serde_json::json!(i32::MAX);
    });
    let e = user.widen_column("id", DataType::Int64).await.expect_err("no schema id left");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains(&format!("schema id {}", i32::MAX)), "{e}");
    let now = cold.catalog().load_table(user.ident()).await.expect("load");
    assert_eq!(now.metadata_location(), Some(location.as_str()), "nothing committed");
}

/// A snapshot summary whose watermark checkpoint names no location of the warehouse (damaged,
/// or edited) is `Corrupt` saying so, not the caller's `InvalidInput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_location_outside_the_warehouse_is_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let every = dotdo_iceberg::Settings { watermark_checkpoint_objects: 0, ..Default::default() };
    let cold =
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).settings(every).build().await.expect("open");
    let o = ObjectId::new("o").expect("id");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "v", 1)]))
        .await
        .expect("append");
    let (table, _) = first_data_file(&cold).await;
    let mut damaged = 0;
    common::edit_metadata(table.metadata_location().expect("metadata"), |json| {
        for snap in json["snapshots"].as_array_mut().expect("snapshots") {
            if let Some(summary) = snap["summary"].as_object_mut() {
                if summary.contains_key("dotdo.watermarks-checkpoint") {
                    summary.insert("dotdo.watermarks-checkpoint".into(), "ftp://elsewhere/wm.json".into());
                    damaged += 1;
                }
            }
        }
    });
    assert!(damaged > 0, "the commit wrote a checkpoint");
    let fresh = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("reopen");
    let e = fresh.watermark(&o).await.expect_err("an unreadable checkpoint location");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("ftp://elsewhere/wm.json"), "{e}");
}

/// An append by a store whose table is stale (another store committed since) while its object
/// store is down: a retryable `Unavailable`, never an `InvalidInput` blaming the batch for a
/// gap it only seems to have; the same append lands once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_seen_on_a_stale_table_while_the_store_is_down_is_retryable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let local: Arc<dyn ObjectStore> = Arc::new(object_store::local::LocalFileSystem::new());
    let faulty = Arc::new(FaultyStore::new(local, 7, 1.0));
    faulty.set_enabled(false);
    let b = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .object_store(faulty.clone())
        .table(["stale"], "changes")
        .build()
        .await
        .expect("open b");
    let a = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).table(["stale"], "changes").build().await;
    let a = a.expect("open a");
    let o = ObjectId::new("x").expect("id");
    let first: Vec<_> = (1..=10).map(|s| put(&o, s, "k", "v", 1)).collect();
    a.append(ColdBatch::single(o.clone(), FencingToken::new(1), first)).await.expect("a commits 1..10");
    faulty.set_enabled(true);
    let next: Vec<_> = (11..=15).map(|s| put(&o, s, "k", "v", 1)).collect();
    let e = b.append(ColdBatch::single(o.clone(), FencingToken::new(1), next.clone())).await.expect_err("store down");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable(), "{e}");
    faulty.set_enabled(false);
    let c = b.append(ColdBatch::single(o.clone(), FencingToken::new(1), next)).await.expect("once it is back");
    assert_eq!(c.records_written, 5);
}

/// An empty or truncated data file (an unsynced file after a power loss, a partial upload) is
/// damage: `Corrupt` naming the file, not a retryable `Unavailable` that a caller would retry
/// forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_or_empty_data_file_is_corrupt_and_names_the_file() {
    for keep in [0usize, 9, 40] {
        let dir = tempfile::tempdir().expect("tempdir");
        let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("open");
        let o = ObjectId::new("o").expect("id");
        cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "v", 1)]))
            .await
            .expect("append");
        let (_, file) = first_data_file(&cold).await;
        let local = file.strip_prefix("file://").expect("local").to_string();
        let bytes = std::fs::read(&local).expect("read");
        std::fs::write(&local, &bytes[..keep]).expect("truncate");
        let name = file.rsplit('/').next().expect("name");
        let fresh = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("reopen");
        let err = fresh.load_state(&o, AsOf::Latest).await.expect_err("truncated file");
        assert_eq!(err.kind(), &ErrorKind::Corrupt, "{keep} bytes kept: {err}");
        assert!(!err.is_retryable(), "{err}");
        assert!(err.to_string().contains(name), "error names the file: {err}");
        let fresh = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("reopen");
        let err = dotdo_core::IndexAccelerator::lookup(&fresh, &o, "k", AsOf::Latest).await.expect_err("lookup");
        assert_eq!(err.kind(), &ErrorKind::Corrupt, "{keep} bytes kept: {err}");
        assert!(err.to_string().contains(name), "error names the file: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_whose_reply_was_lost_are_found_by_reading_back_not_repeated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = dotdo_iceberg::catalog::default_sqlite_uri(dir.path());
    let warehouse = format!("file://{}", dir.path().display());
    let (build, lossy) = common::lossy_sql_catalog(uri, warehouse, 7);
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .catalog(dotdo_iceberg::CatalogConfig::Custom(build))
        .table(["lossy"], "changes")
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    let mut acked = 0u64;
    for i in 1..=60u64 {
        let batch = ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, i, "k", "v", 1)]);
        let mut tries = 0;
        loop {
            tries += 1;
            assert!(tries < 50, "batch {i} never acknowledged");
            match cold.append(batch.clone()).await {
                Ok(c) => {
                    assert_eq!(c.watermarks[&o].through, i);
                    if c.snapshot.is_some() {
                        acked += 1;
                    }
                    break;
                }
                Err(e) => assert!(e.is_retryable() || e.kind() == &ErrorKind::AmbiguousOutcome, "{e}"),
            }
        }
    }
    let cat = lossy.lock().clone().expect("catalog built");
    let (lost, failed) = (cat.lost.load(Ordering::SeqCst), cat.failed.load(Ordering::SeqCst));
    assert!(lost >= 5 && failed >= 2, "too few injected catalog faults: lost {lost}, failed {failed}");
    let seqs: Vec<u64> = cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=60).collect::<Vec<_>>(), "a lost reply must not cause a second commit");
    assert_eq!(cold.snapshots().await.expect("snapshots").len(), 60, "one snapshot per batch");
    assert_eq!(acked, 60, "every batch reported its own snapshot");
}

/// Attempts whose outcome is unknown (here the new table metadata cannot be written: a store
/// in trouble) are spaced by the backoff, as conflicts and failed commits are: three of them
/// take at least half of 100 + 200 + 400 ms (the pauses are jittered down to half). They ran
/// back to back before. The batch then lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_of_unknown_outcome_back_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faulty = FaultyStore::quiet_local();
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .object_store(faulty.clone())
        .table(["m"], "changes")
        .settings(dotdo_iceberg::Settings {
            retry_base_delay: std::time::Duration::from_millis(100),
            ..Default::default()
        })
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    *faulty.fail_puts_of.lock() = Some((".metadata.json".into(), 3));
    let clock = dotdo_core::SystemClock::new();
    let started = clock.monotonic();
    let c = cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "v", 1)])).await;
    let took = clock.monotonic().saturating_sub(started);
    assert_eq!(c.expect("lands on the fourth attempt").records_written, 1);
    assert_eq!(faulty.fail_puts_of.lock().as_ref().map(|(_, n)| *n), Some(0), "three failed writes");
    assert!(took >= std::time::Duration::from_millis(350), "three pauses: {took:?}");
    assert_eq!(cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").len(), 1);
}

/// An append whose commit fails before anything is sent to the catalog (its manifest cannot be
/// written), while the table cannot be read back either (an object-store outage), is a
/// retryable `Unavailable`: it certainly did not land. It was `AmbiguousOutcome` (an unknown
/// outcome that could not be read back), which tells a caller a commit may have happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_was_never_sent_is_unavailable_not_ambiguous() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faulty = FaultyStore::quiet_local();
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .object_store(faulty.clone())
        .table(["m"], "changes")
        .settings(dotdo_iceberg::Settings { refresh_reads: false, ..Default::default() })
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "v", 1)]))
        .await
        .expect("a first commit");
    *faulty.fail_puts_of.lock() = Some(("-m0.avro".into(), 1000));
    *faulty.fail_reads_of.lock() = Some(".metadata.json".into());
    let batch = ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 2, "k", "w", 1)]);
    let e = cold.append(batch.clone()).await.expect_err("the store is out");
    assert_eq!(e.kind(), &dotdo_core::ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable(), "{e}");
    assert!(
        faulty.fail_puts_of.lock().as_ref().is_some_and(|(_, n)| *n < 1000),
        "no manifest write was refused: the commit was not stopped before it was sent"
    );
    *faulty.fail_puts_of.lock() = None;
    *faulty.fail_reads_of.lock() = None;
    assert_eq!(cold.refresh().await.expect("table").metadata().snapshots().count(), 1, "nothing landed");
    assert_eq!(cold.append(batch).await.expect("once the store is back").records_written, 1);
}

/// A compaction whose manifest of new files is written but answered as failed (its reply lost)
/// deletes it: the attempt ended before its swap, and nothing references the file (it stayed
/// until a cleanup found it old enough, one per attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_whose_manifest_write_failed_leaves_no_manifest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faulty = FaultyStore::quiet_local();
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .object_store(faulty.clone())
        .table(["m"], "changes")
        .settings(dotdo_iceberg::Settings { max_commit_attempts: 2, ..Default::default() })
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    for seq in 1..=4 {
        cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, seq, "k", "v", 1)]))
            .await
            .expect("append");
    }
    let manifests = || common::files_ending_with(dir.path(), "-m0.avro").len();
    let before = manifests();
    *faulty.lose_puts_of.lock() = Some(("-m0.avro".into(), 1000));
    cold.compact(dotdo_iceberg::CompactOptions::default()).await.expect_err("every manifest write fails");
    assert!(
        faulty.lose_puts_of.lock().as_ref().is_some_and(|(_, n)| *n < 1000),
        "no manifest write was lost: the compaction did not get that far"
    );
    *faulty.lose_puts_of.lock() = None;
    assert_eq!(manifests(), before, "the failed attempts' manifests are deleted");
    cold.compact(dotdo_iceberg::CompactOptions::default()).await.expect("once the store answers");
    assert_eq!(cold.load_state(&o, AsOf::Latest).await.expect("state").entries.len(), 1);
}

/// A table dropped (and its files removed) under a store that reads its cached table
/// (`refresh_reads` off): a read finds the files missing and the table gone, and answers
/// `NotFound`, as for any read of a missing table (it was `Corrupt`, naming the missing file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_a_table_dropped_meanwhile_is_not_found_not_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["m"], "changes")
        .settings(dotdo_iceberg::Settings { refresh_reads: false, ..Default::default() })
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    let c = cold
        .append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "v", 1)]))
        .await
        .expect("append");
    let ident = iceberg::TableIdent::from_strs(["m", "changes"]).expect("ident");
    cold.catalog().drop_table(&ident).await.expect("drop");
    let data = common::files_ending_with(dir.path(), ".parquet");
    assert!(!data.is_empty());
    for f in data {
        std::fs::remove_file(f).expect("remove");
    }
    for as_of in [AsOf::Latest, AsOf::Snapshot(c.snapshot.expect("snapshot"))] {
        let e = cold.load_state(&o, as_of).await.expect_err("the table is gone");
        assert_eq!(e.kind(), &ErrorKind::NotFound, "{as_of:?}: {e}");
    }
}

/// An append with an attempt of unknown outcome, whose next attempt then conflicts while the
/// table cannot be read back, is `AmbiguousOutcome`: the first attempt may still land. It was a
/// retryable `Unavailable`, which says the batch did not land. Once the catalog answers again,
/// the same batch is committed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsettled_append_that_cannot_read_back_after_a_conflict_is_ambiguous() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = dotdo_iceberg::catalog::default_sqlite_uri(dir.path());
    let (build, slot) = common::switched_sql_catalog(uri, format!("file://{}", dir.path().display()));
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .catalog(dotdo_iceberg::CatalogConfig::Custom(build))
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    let catalog = slot.lock().clone().expect("catalog built");
    catalog.reset_next_update.store(true, std::sync::atomic::Ordering::SeqCst);
    catalog.conflict_then_fail_loads.store(true, std::sync::atomic::Ordering::SeqCst);
    let batch = ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "v", 1)]);
    let e = cold.append(batch.clone()).await.expect_err("unknown outcome, then no read-back");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
    catalog.fail_loads.store(false, std::sync::atomic::Ordering::SeqCst);
    let c = cold.append(batch).await.expect("once the catalog answers");
    assert_eq!(c.records_written + c.records_skipped, 1);
    assert_eq!(cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").len(), 1);
}

/// Through a catalog other than the SQL one, an append whose last attempt's outcome is unknown
/// and whose final read-back does not find it is `AmbiguousOutcome`: the catalog may still be
/// at the request (it was the attempt's own error, a retryable `Unavailable` that says the
/// batch did not land, and the request landed after). The same batch again is skipped once it
/// has landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: waiting for the late commit
async fn an_append_whose_request_lands_after_the_read_back_is_ambiguous() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = dotdo_iceberg::catalog::default_sqlite_uri(dir.path());
    let (build, slot) = common::switched_sql_catalog(uri, format!("file://{}", dir.path().display()));
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .catalog(dotdo_iceberg::CatalogConfig::Custom(build))
        .settings(dotdo_iceberg::Settings { max_commit_attempts: 1, ..Default::default() })
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    let catalog = slot.lock().clone().expect("catalog built");
    let gate = Arc::new(tokio::sync::Notify::new());
    *catalog.late_next_update.lock() = Some(gate.clone());
    let batch = ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "v", 1)]);
    let e = cold.append(batch.clone()).await.expect_err("no reply");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
    assert!(!catalog.late_landed.load(Ordering::SeqCst), "answered before the request landed");
    gate.notify_one();
    let started = std::time::Instant::now();
    while !catalog.late_landed.load(Ordering::SeqCst) && started.elapsed() < std::time::Duration::from_secs(20) {
        common::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(catalog.late_landed.load(Ordering::SeqCst), "the request landed");
    // (One attempt per append: the store learns of the late commit first.)
    cold.refresh().await.expect("refresh");
    let c = cold.append(batch).await.expect("the same batch");
    assert_eq!((c.records_written, c.records_skipped), (0, 1), "landed once, late");
    assert_eq!(cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").len(), 1);
}

/// The same when the table then cannot be read back for good (a reply that does not parse, as
/// a proxy's error page): still `AmbiguousOutcome`, since the first attempt may land. The
/// reload's non-retryable error was passed on as it was, which says nothing about that attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsettled_append_whose_read_back_is_refused_for_good_is_ambiguous() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, slot) = switched_store(dir.path()).await;
    let o = ObjectId::new("o").expect("id");
    let catalog = slot.lock().clone().expect("catalog built");
    catalog.reset_next_update.store(true, Ordering::SeqCst);
    catalog.conflict_then_fail_loads.store(true, Ordering::SeqCst);
    catalog.loads_fail_for_good.store(true, Ordering::SeqCst);
    let batch = ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "v", 1)]);
    let e = cold.append(batch.clone()).await.expect_err("unknown outcome, then a read-back refused");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
    assert!(e.to_string().contains("parse response"), "the refusal is told: {e}");
    catalog.fail_loads.store(false, Ordering::SeqCst);
    let c = cold.append(batch).await.expect("once the catalog answers");
    assert_eq!(c.records_written + c.records_skipped, 1);
    assert_eq!(cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").len(), 1);
}

/// An expiry whose commit landed with its reply lost, after which the table cannot be read
/// back, is `AmbiguousOutcome`: it was the load's `Unavailable`, which says nothing was expired.
/// Expiring again once the catalog answers settles it (nothing left to expire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_of_unknown_outcome_that_cannot_be_read_back_is_ambiguous() {
    use dotdo_core::testkit::LoseNextReply;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, slot) = switched_store(dir.path()).await;
    let o = ObjectId::new("o").expect("id");
    puts(&cold, &o, 3).await;
    let catalog = slot.lock().clone().expect("catalog built");
    catalog.fail_loads_after_lost.store(true, Ordering::SeqCst);
    catalog.switch.arm();
    let e = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect_err("lost reply, then no read-back");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
    assert_eq!(catalog.lost.load(Ordering::SeqCst), 1, "the expiry landed");
    catalog.fail_loads_after_lost.store(false, Ordering::SeqCst);
    catalog.fail_loads.store(false, Ordering::SeqCst);
    let report = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("once the catalog answers");
    assert_eq!((report.expired.len(), report.retained), (0, 1), "{report:?}");
    assert_eq!(cold.load_state(&o, AsOf::Latest).await.expect("state").entries.len(), 1);
}

/// An expiry whose attempt certainly did not land (its metadata file's write failed: the file is
/// deleted, the pointer not moved) and whose table then cannot be read is the load's retryable
/// `Unavailable`, not `AmbiguousOutcome`: nothing may have been expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_that_certainly_did_not_land_is_not_ambiguous_when_the_table_cannot_be_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (recorded, cold) = recorded_local_store(dir.path()).await;
    let o = ObjectId::new("o").expect("id");
    puts(&cold, &o, 3).await;
    *recorded.lose_puts_of.lock() = Some((".metadata.json".to_string(), 1));
    // From the failed write on, the table's metadata cannot be read (the store in trouble).
    let outage = recorded.clone();
    *recorded.before_put.lock() = Some(common::PutHook(
        ".metadata.json".to_string(),
        Box::pin(async move {
            *outage.fail_reads_of.lock() = Some(".metadata.json".into());
        }),
    ));
    let e = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect_err("the table cannot be read");
    assert_eq!(recorded.lost_replies.load(Ordering::SeqCst), 1, "the write ran and its reply was lost");
    assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Unavailable, true), "{e}");
    *recorded.fail_reads_of.lock() = None;
    let report = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("once the store answers");
    assert_eq!(report.expired.len(), 2, "{report:?}");
}

/// Through another catalog than SQL, an expiry attempt that failed before it reached the catalog
/// (the check that the table is unmoved could not read it) and whose table then cannot be read
/// is the load's retryable `Unavailable`: nothing was sent, so nothing may have been expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_never_sent_is_not_ambiguous_when_the_table_cannot_be_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, slot) = switched_store(dir.path()).await;
    let o = ObjectId::new("o").expect("id");
    puts(&cold, &o, 3).await;
    let catalog = slot.lock().clone().expect("catalog built");
    // The expiry's own load goes through; the check before its commit and every load after fail.
    *catalog.fail_loads_after.lock() = Some(1);
    let e = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect_err("the table cannot be read");
    assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Unavailable, true), "{e}");
    catalog.fail_loads.store(false, Ordering::SeqCst);
    let report = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("once the catalog answers");
    assert_eq!(report.expired.len(), 2, "{report:?}");
}

/// A user table `u.events` (one `Int32` column) on [`switched_store`]'s catalog, a batch of three
/// rows for it, and the catalog.
async fn user_table_on_a_switched_catalog(
    dir: &std::path::Path,
) -> (dotdo_iceberg::ArrowTable, arrow_array::RecordBatch, Arc<common::LossyCatalog>) {
    use arrow_array::{Int32Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    let (cold, slot) = switched_store(dir).await;
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false)]));
    let user = cold.arrow_table(&["u"], "events", schema.clone()).await.expect("table");
    let rows = RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from(vec![1, 2, 3]))]).expect("batch");
    let catalog = slot.lock().clone().expect("catalog built");
    (user, rows, catalog)
}

/// A user-table append with an attempt of unknown outcome, whose next attempt conflicts and
/// whose table then cannot be loaded for good, is `AmbiguousOutcome` (it was the load's
/// non-retryable error); the same batch id once the catalog answers is committed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsettled_user_table_append_whose_load_is_refused_for_good_is_ambiguous() {
    use arrow_array::RecordBatch;
    let dir = tempfile::tempdir().expect("tempdir");
    let (user, rows, catalog) = user_table_on_a_switched_catalog(dir.path()).await;
    catalog.reset_next_update.store(true, Ordering::SeqCst);
    catalog.conflict_then_fail_loads.store(true, Ordering::SeqCst);
    catalog.loads_fail_for_good.store(true, Ordering::SeqCst);
    let e = user.append("s", 1, vec![rows.clone()]).await.expect_err("unknown outcome, then a load refused");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
    catalog.fail_loads.store(false, Ordering::SeqCst);
    let c = user.append("s", 1, vec![rows]).await.expect("once the catalog answers");
    assert_eq!(c.rows, 3, "the first attempt did not land: committed now");
    assert_eq!(user.read_all().await.expect("read").iter().map(RecordBatch::num_rows).sum::<usize>(), 3);
}

/// A user-table append whose attempt conflicted for certain, and whose table then cannot be
/// loaded for good, fails and leaves no data file behind: the conflicted attempt's files are
/// nobody's (they stayed until a cleanup found them old enough).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_table_append_that_ends_early_after_a_conflict_deletes_its_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (user, rows, catalog) = user_table_on_a_switched_catalog(dir.path()).await;
    catalog.conflict_then_fail_loads.store(true, Ordering::SeqCst);
    catalog.loads_fail_for_good.store(true, Ordering::SeqCst);
    let e = user.append("s", 1, vec![rows.clone()]).await.expect_err("a conflict, then a load refused");
    assert_ne!(e.kind(), &ErrorKind::AmbiguousOutcome, "nothing may have landed: {e}");
    let data = |dir: &std::path::Path| {
        common::files_ending_with(dir, ".parquet")
            .into_iter()
            .filter(|f| f.to_string_lossy().contains("events"))
            .count()
    };
    assert_eq!(data(dir.path()), 0, "the conflicted attempt's data files are deleted");
    catalog.fail_loads.store(false, Ordering::SeqCst);
    assert_eq!(user.append("s", 1, vec![rows]).await.expect("once the catalog answers").rows, 3);
    assert_eq!(data(dir.path()), 1);
}

/// A user-table append whose commit landed with its reply lost, after which the table cannot be
/// read back (its metadata unreadable while the store is out), fails with `AmbiguousOutcome`:
/// it was `Unavailable`, which says the batch did not land (re-sent under another batch id, its
/// rows went in twice). Once the store is back, the same batch id is answered as committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_table_append_of_unknown_outcome_that_cannot_be_read_back_is_ambiguous() {
    use arrow_array::{Int32Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    use dotdo_core::testkit::LoseNextReply;
    let dir = tempfile::tempdir().expect("tempdir");
    let faulty = FaultyStore::quiet_local();
    let uri = dotdo_iceberg::catalog::default_sqlite_uri(dir.path());
    let (build, slot) = common::switched_sql_catalog(uri, format!("file://{}", dir.path().display()));
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .object_store(faulty.clone())
        .catalog(dotdo_iceberg::CatalogConfig::Custom(build))
        .settings(dotdo_iceberg::Settings { max_commit_attempts: 2, ..Default::default() })
        .build()
        .await
        .expect("open");
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false)]));
    let user = cold.arrow_table(&["u"], "events", schema.clone()).await.expect("table");
    let rows = RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from(vec![1, 2, 3]))]).expect("batch");
    // The commit lands and its reply is lost; from its new metadata file on, metadata reads fail.
    slot.lock().clone().expect("catalog built").switch.arm();
    let outage = faulty.clone();
    *faulty.before_put.lock() = Some(common::PutHook(
        ".metadata.json".to_string(),
        Box::pin(async move {
            *outage.fail_reads_of.lock() = Some(".metadata.json".into());
        }),
    ));
    let e = user.append("s", 1, vec![rows.clone()]).await.expect_err("unknown outcome");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
    *faulty.fail_reads_of.lock() = None;
    let c = user.append("s", 1, vec![rows]).await.expect("the same batch once the store is back");
    assert_eq!((c.rows, c.snapshot), (0, None), "a replay: the earlier call committed it");
    assert_eq!(user.read_all().await.expect("read").iter().map(RecordBatch::num_rows).sum::<usize>(), 3);
}

/// An expiry whose commit landed but whose reply was lost reports the snapshots it expired (the
/// retry finds them gone and nothing left to expire: it reported none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_whose_reply_was_lost_reports_what_it_expired() {
    use dotdo_core::testkit::LoseNextReply;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, slot) = switched_store(dir.path()).await;
    let o = ObjectId::new("o").expect("id");
    puts(&cold, &o, 3).await;
    let before: Vec<i64> = cold.snapshots().await.expect("snapshots").iter().map(|s| s.id).collect();
    assert_eq!(before.len(), 3);
    slot.lock().clone().expect("catalog built").switch.arm();
    let report = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("expire");
    let after: Vec<i64> = cold.snapshots().await.expect("snapshots").iter().map(|s| s.id).collect();
    assert_eq!(after.len(), 1, "{after:?}");
    let mut expired = report.expired.clone();
    expired.sort_unstable();
    let mut gone: Vec<i64> = before.into_iter().filter(|id| !after.contains(id)).collect();
    gone.sort_unstable();
    assert_eq!(expired, gone, "{report:?}");
    assert_eq!(report.retained, 1, "{report:?}");
}

/// `widen_column` retries a commit that failed for now (its metadata file could not be
/// written: a store in trouble), as `add_column` does: it gave up at the first `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widen_column_retries_a_commit_that_failed_for_now() {
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let (faulty, cold) = recorded_local_store(dir.path()).await;
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int32, false)]));
    let user = cold.arrow_table(&["u"], "events", schema).await.expect("table");
    *faulty.fail_puts_of.lock() = Some((".metadata.json".into(), 1));
    let wider = user.widen_column("n", DataType::Int64).await.expect("widened on the second attempt");
    assert_eq!(wider.schema().field(0).data_type(), &DataType::Int64);
    assert_eq!(faulty.fail_puts_of.lock().as_ref().map(|(_, n)| *n), Some(0), "the first attempt failed");
}

/// A user-table append whose every attempt lost its race (another writer committed between its
/// files and its swap) deletes the data files it wrote: nothing references them (they were left
/// until a cleanup past the retention).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_table_append_that_failed_for_certain_leaves_no_data_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (recorded, user, rows, other) = recorded_user_table_and_another_writer(dir.path(), 1, None).await;
    let first = rows(1);
    *recorded.before_put.lock() = Some(common::PutHook(
        ".metadata.json".into(),
        Box::pin(async move {
            other.append("other", 1, vec![first]).await.expect("the other stream commits first");
        }),
    ));
    recorded.puts.lock().clear();
    let e = user.append("s", 1, vec![rows(2)]).await.expect_err("its only attempt lost the race");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    let written: Vec<String> = recorded.puts.lock().iter().filter(|p| p.ends_with(".parquet")).cloned().collect();
    assert_eq!(written.len(), 1, "this append wrote one data file: {written:?}");
    let data = common::files_ending_with(dir.path(), ".parquet");
    assert_eq!(data.len(), 1, "only the committed append's file is left: {data:?}");
    assert_eq!(user.last_batch("other").await.expect("mark"), 1);
    assert_eq!(user.last_batch("s").await.expect("mark"), 0);
}

/// A user-table append whose attempt lost the race to another call committing the same batch
/// of its stream (an earlier call of the same producer, dropped by its caller, landing late)
/// reports the batch as committed and deletes the data file of its losing attempt: nothing
/// references it. It was left for good (until a cleanup past the retention).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_table_append_whose_batch_another_call_committed_leaves_no_data_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The other writer is the earlier call, landing late.
    let (recorded, user, rows, late) = recorded_user_table_and_another_writer(dir.path(), 2, None).await;
    let first = rows(1);
    *recorded.before_put.lock() = Some(common::PutHook(
        ".metadata.json".into(),
        Box::pin(async move {
            late.append("s", 1, vec![first]).await.expect("the earlier call of batch 1 lands first");
        }),
    ));
    user.append("s", 1, vec![rows(1)]).await.expect("batch 1 is committed (by the other call)");
    assert_eq!(user.last_batch("s").await.expect("mark"), 1);
    let data = common::files_ending_with(dir.path(), ".parquet");
    assert_eq!(data.len(), 1, "only the committed call's file is left: {data:?}");
}

/// A user-table append whose files are past half of `min_cleanup_retention` before its first
/// attempt's swap (another writer committed meanwhile, and a slow store or a stall took the
/// time) is refused just before the swap, and the next attempt writes the files again instead
/// of reusing them: a cleanup running meanwhile may already have judged them unreferenced and
/// would delete them after the commit. The stale file is deleted (that attempt failed for
/// certain). Before, the retry committed the old files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_table_append_rewrites_files_too_old_to_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = dotdo_core::ManualClock::new(dotdo_core::SystemClock::new().now());
    let (recorded, user, rows, other) =
        recorded_user_table_and_another_writer(dir.path(), 3, Some(clock.clone())).await;
    let first = rows(1);
    let c = clock.clone();
    *recorded.before_put.lock() = Some(common::PutHook(
        ".metadata.json".into(),
        Box::pin(async move {
            other.append("other", 1, vec![first]).await.expect("the other stream commits first");
            // Default min_cleanup_retention 1 hour: past half of it.
            c.advance(std::time::Duration::from_secs(31 * 60));
        }),
    ));
    recorded.puts.lock().clear();
    let commit = user.append("s", 1, vec![rows(2)]).await.expect("committed on a later attempt");
    assert_eq!(commit.rows, 1);
    let written: Vec<String> = recorded.puts.lock().iter().filter(|p| p.ends_with(".parquet")).cloned().collect();
    assert_eq!(written.len(), 2, "the file was written again for the second attempt: {written:?}");
    let data = common::files_ending_with(dir.path(), ".parquet");
    assert_eq!(data.len(), 2, "the other writer's file and this append's second one: {data:?}");
    let name = |p: &String| p.rsplit('/').next().expect("name").to_string();
    let left: Vec<String> = data.iter().map(|p| name(&p.display().to_string())).collect();
    assert!(!left.contains(&name(&written[0])), "the stale file was deleted: {left:?}");
    assert!(left.contains(&name(&written[1])), "the new one committed: {left:?}");
    let rows: usize = user.read_all().await.expect("read").iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 2);
}

/// An append on a store so slow that every attempt's own new data files are past half of
/// `min_cleanup_retention` by its catalog swap (here each data file's put takes 31 minutes of the
/// store's clock; the default minimum is an hour) fails after two such attempts with a
/// non-retryable `Conflict` that says why, nothing committed: it was a retryable `Conflict`
/// after every attempt (16 here) wrote its files again, and the caller retried that for good.
/// Change table and user table alike; their files are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_too_slow_to_ever_commit_is_not_retryable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = dotdo_core::ManualClock::new(dotdo_core::SystemClock::new().now());
    let (recorded, user, rows, _other) =
        recorded_user_table_and_another_writer(dir.path(), 16, Some(clock.clone())).await;
    let changes = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .object_store(recorded.clone())
        .table(["c"], "changes")
        .with_clock(Arc::new(clock.clone()))
        .settings(dotdo_iceberg::Settings { max_commit_attempts: 16, ..Default::default() })
        .build()
        .await
        .expect("open");
    let c = clock.clone();
    *recorded.each_put.lock() =
        Some(common::EachPut(".parquet".into(), Arc::new(move || c.advance(std::time::Duration::from_secs(31 * 60)))));
    recorded.puts.lock().clear();
    let e = user.append("s", 1, vec![rows(1)]).await.expect_err("too slow");
    assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Conflict, false), "{e}");
    assert!(e.to_string().contains("min_cleanup_retention"), "says why: {e}");
    assert_eq!(user.last_batch("s").await.expect("mark"), 0, "nothing committed");
    let o = ObjectId::new("o").expect("id");
    let batch = ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 1, "k", "v", 1)]);
    let e = changes.append(batch).await.expect_err("too slow");
    assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Conflict, false), "{e}");
    assert_eq!(changes.watermark(&o).await.expect("watermark").through, 0, "nothing committed");
    let written = recorded.puts.lock().iter().filter(|p| p.ends_with(".parquet")).count();
    assert_eq!(written, 4, "two attempts each, not sixteen");
    assert!(common::files_ending_with(dir.path(), ".parquet").is_empty(), "their files are deleted");
}

/// A user-table append that stalls between writing its data file and committing it past half of
/// `min_cleanup_retention` (the clock jumps while the file is written) does not commit that
/// file: a cleanup running meanwhile may have judged it unreferenced. It writes it again and
/// commits the new one; the stale one is deleted. On a format version 2 table (dotdo's fast
/// append checks just before its catalog swap) and a version 1 table (iceberg's own append,
/// checked before it starts: that path committed the stale file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_user_table_append_does_not_commit_its_stale_file() {
    for version in [iceberg::spec::FormatVersion::V2, iceberg::spec::FormatVersion::V1] {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = dotdo_core::ManualClock::new(dotdo_core::SystemClock::new().now());
        if version == iceberg::spec::FormatVersion::V1 {
            let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("open");
            common::create_v1_events_table(&cold).await;
        }
        let (recorded, user, rows, _other) =
            recorded_user_table_and_another_writer(dir.path(), 3, Some(clock.clone())).await;
        let probe = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("open");
        let table = probe.catalog().load_table(user.ident()).await.expect("load");
        assert_eq!(table.metadata().format_version(), version);
        let c = clock.clone();
        *recorded.before_put.lock() = Some(common::PutHook(
            ".parquet".into(),
            Box::pin(async move { c.advance(std::time::Duration::from_secs(31 * 60)) }),
        ));
        recorded.puts.lock().clear();
        let commit = user.append("s", 1, vec![rows(1)]).await.expect("committed on a later attempt");
        assert_eq!(commit.rows, 1, "{version:?}");
        let written: Vec<String> = recorded.puts.lock().iter().filter(|p| p.ends_with(".parquet")).cloned().collect();
        assert_eq!(written.len(), 2, "{version:?}: the file was written again: {written:?}");
        let data = common::files_ending_with(dir.path(), ".parquet");
        assert_eq!(data.len(), 1, "{version:?}: the stale file was deleted: {data:?}");
        assert!(data[0].display().to_string().ends_with(written[1].rsplit('/').next().expect("name")), "{version:?}");
        let n: usize = user.read_all().await.expect("read").iter().map(|b| b.num_rows()).sum();
        assert_eq!(n, 1, "{version:?}");
    }
}

/// On a format-version 1 table (iceberg's own append path, through the SQL catalog's pointer
/// swap), an append that loses its swap to another writer leaves no manifest list or manifest
/// behind: iceberg writes them before the swap and deletes neither (only the metadata file was
/// deleted; they stayed until a cleanup found them old enough).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_swap_on_a_v1_table_leaves_no_manifests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("open");
    common::create_v1_events_table(&cold).await;
    let (recorded, user, rows, other) = recorded_user_table_and_another_writer(dir.path(), 3, None).await;
    user.append("s", 1, vec![rows(1)]).await.expect("first");
    // The other writer commits while this one writes its new metadata file (after its
    // manifests and list): its pointer swap is lost.
    let (o, second) = (other.clone(), rows(2));
    *recorded.before_put.lock() = Some(common::PutHook(
        ".metadata.json".into(),
        Box::pin(async move {
            o.append("t", 1, vec![second]).await.expect("the other writer");
        }),
    ));
    recorded.puts.lock().clear();
    user.append("s", 2, vec![rows(3)]).await.expect("committed after a lost swap");
    let lists = recorded.puts.lock().iter().filter(|p| p.contains("/snap-")).count();
    assert!(lists >= 2, "the first attempt lost its swap and a second was made: {lists} manifest lists written");
    let table = cold.catalog().load_table(user.ident()).await.expect("load");
    let mut referenced = std::collections::HashSet::new();
    for snap in table.metadata().snapshots() {
        referenced.insert(snap.manifest_list().rsplit('/').next().expect("name").to_string());
        let list = table.manifest_list_reader(snap).load().await.expect("list");
        for m in list.entries() {
            referenced.insert(m.manifest_path.rsplit('/').next().expect("name").to_string());
        }
    }
    let on_disk: Vec<String> = common::files_ending_with(dir.path(), ".avro")
        .into_iter()
        .filter(|f| f.to_string_lossy().contains("events"))
        .map(|f| f.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    let orphans: Vec<&String> = on_disk.iter().filter(|f| !referenced.contains(*f)).collect();
    assert!(orphans.is_empty(), "files of the lost attempt left: {orphans:?}");
    let n: usize = user.read_all().await.expect("read").iter().map(|b| b.num_rows()).sum();
    assert_eq!(n, 3);
}

/// A commit without a snapshot (an expiry) whose metadata file was written but whose write
/// failed (the reply lost) did not land, and leaves no metadata file behind (a reader guessing
/// the newest version from the directory's listing would load it); the expiry's next attempt
/// commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_without_a_snapshot_leaves_no_metadata_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (recorded, cold) = recorded_local_store(dir.path()).await;
    let o = ObjectId::new("o").expect("id");
    puts(&cold, &o, 3).await;
    let metadata_files = || {
        let mut files: Vec<String> = common::files_ending_with(dir.path(), ".metadata.json")
            .into_iter()
            .map(|f| f.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        files.sort();
        files
    };
    let before = metadata_files();
    *recorded.lose_puts_of.lock() = Some((".metadata.json".to_string(), 1));
    // (The expiry tries again after the failed attempt.)
    let report = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("expire");
    assert_eq!(recorded.lost_replies.load(Ordering::SeqCst), 1, "the write ran and its reply was lost");
    assert_eq!(report.expired.len(), 2, "{report:?}");
    let after = metadata_files();
    assert_eq!(after.len(), before.len() + 1, "only the landed commit's metadata file was added: {after:?}");
    let current = cold.refresh().await.expect("table").metadata_location().expect("metadata").to_string();
    assert!(current.ends_with(after.iter().find(|f| !before.contains(f)).expect("new")), "{current}");
}

/// A commit through iceberg's own transaction on the SQL catalog (a user table's new column)
/// whose metadata file was written but whose write failed (the reply lost) leaves no metadata
/// file behind; the next attempt commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_transaction_commit_leaves_no_metadata_file() {
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let (recorded, cold) = recorded_local_store(dir.path()).await;
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false)]));
    let user = cold.arrow_table(&["dotdo"], "users", schema).await.expect("user table");
    let metadata_files = || common::files_ending_with(dir.path(), ".metadata.json").len();
    let before = metadata_files();
    *recorded.lose_puts_of.lock() = Some((".metadata.json".to_string(), 1));
    user.add_column("note", DataType::Utf8).await.expect("the next attempt commits");
    assert_eq!(recorded.lost_replies.load(Ordering::SeqCst), 1, "the write ran and its reply was lost");
    assert_eq!(metadata_files(), before + 1, "only the landed commit's metadata file was added");
}

/// Through the in-memory catalog, an append whose only attempt failed with an outcome the
/// catalog reports as unknown, and that the read-back does not find, did not land (the catalog
/// runs in this process: nothing of it lands later): the attempt's own error, not
/// `AmbiguousOutcome`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_memory_catalogs_read_back_settles_an_unknown_outcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recorded = FaultyStore::quiet_local();
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .object_store(recorded.clone())
        .catalog(dotdo_iceberg::CatalogConfig::Memory)
        .settings(dotdo_iceberg::Settings { max_commit_attempts: 1, ..Default::default() })
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    *recorded.fail_puts_of.lock() = Some((".metadata.json".to_string(), 1));
    let e = cold
        .append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "v", 1)]))
        .await
        .expect_err("the metadata write failed");
    assert_ne!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
    assert!(e.is_retryable(), "{e}");
    assert_eq!(cold.watermark(&o).await.expect("watermark").through, 0, "nothing landed");
}

/// A compaction attempt whose manifest list cannot be written deletes the manifests it wrote
/// (nothing can name them; they stayed until a cleanup), and the next attempt commits: every
/// Avro file left in the table's metadata is referenced by a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_attempt_failing_before_its_commit_leaves_no_manifests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (recorded, cold) = recorded_local_store(dir.path()).await;
    let o = ObjectId::new("o").expect("id");
    puts(&cold, &o, 3).await;
    *recorded.fail_puts_containing.lock() = Some(("/snap-".to_string(), 1));
    let report = cold.compact(dotdo_iceberg::CompactOptions::default()).await.expect("compact");
    assert!(report.snapshot.is_some() && report.attempts == 2, "{report:?}");
    assert_eq!(recorded.fail_puts_containing.lock().as_ref().map(|f| f.1), Some(0), "the list's write failed once");
    let table = cold.refresh().await.expect("table");
    let mut referenced = std::collections::BTreeSet::new();
    for s in table.metadata().snapshots() {
        referenced.insert(s.manifest_list().to_string());
        let list = table.manifest_list_reader(s).load().await.expect("list");
        for m in list.entries() {
            referenced.insert(m.manifest_path.clone());
        }
    }
    let referenced: std::collections::BTreeSet<String> =
        referenced.iter().map(|p| p.strip_prefix("file://").unwrap_or(p).to_string()).collect();
    let on_disk: std::collections::BTreeSet<String> =
        common::files_ending_with(dir.path(), ".avro").into_iter().map(|f| f.to_string_lossy().into_owned()).collect();
    let unreferenced: Vec<_> = on_disk.difference(&referenced).collect();
    assert!(unreferenced.is_empty(), "Avro files no snapshot names: {unreferenced:?}");
}

/// A user table `u.events` of one `id` column on a store whose object store records its puts
/// (`attempts` commit attempts per append; the store's clock `clock` if given), a maker of
/// one-row batches, and the same table through another store on the same catalog and warehouse
/// (another writer).
async fn recorded_user_table_and_another_writer(
    dir: &std::path::Path,
    attempts: u32,
    clock: Option<dotdo_core::ManualClock>,
) -> (Arc<FaultyStore>, dotdo_iceberg::ArrowTable, impl Fn(i32) -> arrow_array::RecordBatch, dotdo_iceberg::ArrowTable)
{
    use arrow_array::{Int32Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    let recorded = FaultyStore::quiet_local();
    let mut builder = IcebergColdStore::builder(dir.to_str().expect("utf-8"))
        .object_store(recorded.clone())
        .settings(dotdo_iceberg::Settings { max_commit_attempts: attempts, ..Default::default() });
    if let Some(clock) = clock {
        builder = builder.with_clock(Arc::new(clock));
    }
    let cold = builder.build().await.expect("open");
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false)]));
    let user = cold.arrow_table(&["u"], "events", schema.clone()).await.expect("table");
    let other = IcebergColdStore::builder(dir.to_str().expect("utf-8"))
        .build()
        .await
        .expect("open")
        .arrow_table(&["u"], "events", schema.clone())
        .await
        .expect("table");
    let rows =
        move |id: i32| RecordBatch::try_new(schema.clone(), vec![Arc::new(Int32Array::from(vec![id]))]).expect("b");
    (recorded, user, rows, other)
}

/// A store on local files at `dir` through a [`FaultyStore`] that injects nothing (it records
/// puts and aborts, and takes faults when told).
async fn recorded_local_store(dir: &std::path::Path) -> (Arc<FaultyStore>, IcebergColdStore) {
    let recorded = FaultyStore::quiet_local();
    let cold = IcebergColdStore::builder(dir.to_str().expect("utf-8"))
        .object_store(recorded.clone())
        .build()
        .await
        .expect("open");
    (recorded, cold)
}

/// A file abandoned mid-upload (its writer dropped unfinished: a caller's timeout, an aborted
/// sibling range of a parallel write) aborts its multipart upload. Its parts were left for the
/// bucket's lifecycle rules (billed until then on S3 and GCS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: waiting for the spawned abort
async fn an_abandoned_multipart_upload_is_aborted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (recorded, cold) = recorded_local_store(dir.path()).await;
    let table = cold.refresh().await.expect("table");
    let path = format!("{}/data/abandoned.bin", table.metadata().location());
    let mut w = table.file_io().new_output(&path).expect("output").writer().await.expect("writer");
    // Past the buffer of one put: a multipart upload begins.
    w.write(bytes::Bytes::from(vec![7u8; 12 << 20])).await.expect("write");
    drop(w);
    let started = std::time::Instant::now();
    while recorded.aborts.load(Ordering::SeqCst) == 0 && started.elapsed() < std::time::Duration::from_secs(10) {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(recorded.aborts.load(Ordering::SeqCst), 1, "the upload was aborted");
    assert!(common::files_ending_with(dir.path(), ".bin").is_empty(), "no file");
}

/// A multipart upload that fails is aborted, whatever failed: a part (most part failures
/// surface only when the file is closed), the completion, or a close given up midway (a
/// caller's timeout around it). `object_store`'s `BufWriter` could not abort once its shutdown
/// had begun: after a failed part or a close given up, the upload's parts stayed on the store
/// (billed on S3 and GCS until a lifecycle rule removes them; no abort was counted here). Parts
/// land in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: a close given up after a while; the spawned abort
async fn a_failed_multipart_upload_is_aborted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FaultyStore::quiet_local();
    let root = dotdo_iceberg::StoreRoot::from_store(store.clone(), dir.path().to_str().expect("utf-8")).expect("root");
    let storage = root.factory().build(&iceberg::io::StorageConfig::new()).expect("storage");
    let wait_for_aborts = |n: u64| {
        let store = store.clone();
        async move {
            let started = std::time::Instant::now();
            while store.aborts.load(Ordering::SeqCst) < n && started.elapsed() < std::time::Duration::from_secs(10) {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            store.aborts.load(Ordering::SeqCst)
        }
    };
    // 25 MiB in writes of 1 MiB (the i-th of bytes i): three parts.
    let write_file = |name: &str| {
        let (storage, at) = (storage.clone(), format!("{}/ns/t/data/{name}", root.warehouse));
        async move {
            let mut w = storage.writer(&at).await.expect("writer");
            for i in 0..25u8 {
                w.write(bytes::Bytes::from(vec![i; 1 << 20])).await?;
            }
            w.close().await
        }
    };
    // The second part fails.
    store.uploads.fail_part.store(2, Ordering::SeqCst);
    write_file("part-fails.bin").await.expect_err("a part failed");
    assert_eq!(wait_for_aborts(1).await, 1, "the upload was aborted");
    store.uploads.fail_part.store(0, Ordering::SeqCst);
    // The completion fails.
    store.uploads.fail_completes.store(1, Ordering::SeqCst);
    write_file("complete-fails.bin").await.expect_err("the completion failed");
    assert_eq!(wait_for_aborts(2).await, 2, "the upload was aborted");
    // A close given up while its parts hang.
    store.uploads.hang_parts.store(true, Ordering::SeqCst);
    let at = format!("{}/ns/t/data/given-up.bin", root.warehouse);
    let mut w = storage.writer(&at).await.expect("writer");
    for _ in 0..25 {
        w.write(bytes::Bytes::from(vec![4u8; 1 << 20])).await.expect("write");
    }
    let closed = tokio::time::timeout(std::time::Duration::from_millis(300), w.close()).await;
    assert!(closed.is_err(), "the close cannot finish while its parts hang");
    drop(w);
    assert_eq!(wait_for_aborts(3).await, 3, "the upload was aborted");
    store.uploads.hang_parts.store(false, Ordering::SeqCst);
    for name in ["part-fails.bin", "complete-fails.bin", "given-up.bin"] {
        assert!(common::files_ending_with(dir.path(), name).is_empty(), "{name} was not written");
    }
    // And a whole one still goes up.
    write_file("whole.bin").await.expect("written");
    let whole = std::fs::read(dir.path().join("ns/t/data/whole.bin")).expect("read");
    assert_eq!(whole.len(), 25 << 20);
    for (i, mib) in whole.chunks(1 << 20).enumerate() {
        assert!(mib.iter().all(|&b| usize::from(b) == i), "MiB {i} holds another write's bytes");
    }
    assert_eq!(store.aborts.load(Ordering::SeqCst), 3);
    // A completion answered `NotFound` after it completed (S3's `NoSuchUpload` to a completion
    // object_store sent again, the first one's reply lost): the file is there, whole, and the
    // write succeeded (it failed as a missing file: `Corrupt` or a non-retryable error).
    store.uploads.not_found_lands.store(true, Ordering::SeqCst);
    store.uploads.not_found_completes.store(1, Ordering::SeqCst);
    write_file("retried-complete.bin").await.expect("the file is there as written");
    let file = std::fs::read(dir.path().join("ns/t/data/retried-complete.bin")).expect("read");
    assert_eq!(file.len(), 25 << 20);
    // (Aborts run spawned: one that should not happen is given time to.)
    common::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(store.aborts.load(Ordering::SeqCst), 3, "nothing aborted");
    // Answered `NotFound` and not completed: a failure to write again, a passing store error
    // (not `NotFound`, which is classed as a missing, damaged file).
    store.uploads.not_found_lands.store(false, Ordering::SeqCst);
    store.uploads.not_found_completes.store(1, Ordering::SeqCst);
    let e = write_file("gone.bin").await.expect_err("the upload is gone");
    let os =
        std::error::Error::source(&e).and_then(|s| s.downcast_ref::<object_store::Error>()).expect("a store error");
    assert!(matches!(os, object_store::Error::Generic { .. }), "{os:?}");
    assert!(e.to_string().contains("write the file again") && !e.to_string().contains("404"), "{e}");
    assert_eq!(wait_for_aborts(4).await, 4, "the upload was aborted");
    assert!(common::files_ending_with(dir.path(), "gone.bin").is_empty());
    // A part answered `NotFound` (the upload expired under the writer): likewise a failure to
    // write again, not a missing file (it was `Corrupt`, or for a data file a non-retryable
    // error failing the append for good).
    let second = store.uploads.parts.load(Ordering::SeqCst) + 2;
    store.uploads.not_found_part.store(second, Ordering::SeqCst);
    let e = write_file("part-gone.bin").await.expect_err("the upload is gone");
    let os =
        std::error::Error::source(&e).and_then(|s| s.downcast_ref::<object_store::Error>()).expect("a store error");
    assert!(matches!(os, object_store::Error::Generic { .. }), "{os:?}");
    assert!(e.to_string().contains("write the file again") && !e.to_string().contains("NoSuchUpload"), "{e}");
    assert_eq!(wait_for_aborts(5).await, 5, "the upload was aborted");
    assert!(common::files_ending_with(dir.path(), "part-gone.bin").is_empty());
}

/// A large user-table append is written as contiguous row ranges side by side, one file each
/// (up to the machine's parallelism; a Parquet encode is single-threaded per file), and its
/// rows read back whole. When one range's file cannot be written the append fails and the
/// other ranges' files are deleted: nothing references them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_user_table_append_is_written_in_parallel_ranges_and_a_failed_range_leaves_no_files() {
    use arrow_array::{Array, Int32Array, LargeBinaryArray, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let (recorded, cold) = recorded_local_store(dir.path()).await;
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int32, false),
        Field::new("payload", DataType::LargeBinary, false),
    ]));
    let user = cold.arrow_table(&["u"], "big", schema.clone()).await.expect("table");
    // 40 rows of 1 MiB: 40 MiB of Arrow data, two ranges of 16 MiB or more.
    let ids: Vec<i32> = (0..40).collect();
    let payloads: Vec<Vec<u8>> = ids.iter().map(|&i| vec![i as u8; 1 << 20]).collect();
    let batch = RecordBatch::try_new(
        schema,
        vec![Arc::new(Int32Array::from(ids.clone())), Arc::new(LargeBinaryArray::from_iter_values(payloads.iter()))],
    )
    .expect("batch");
    let ranges = std::thread::available_parallelism().map_or(1, |n| n.get()).min(2);
    *recorded.fail_puts_of.lock() = Some((".parquet".into(), 1));
    let e = user.append("s", 1, vec![batch.clone()]).await.expect_err("one range's file failed");
    assert!(e.is_retryable(), "{e}");
    let written = recorded.puts.lock().iter().filter(|p| p.ends_with(".parquet")).count();
    assert_eq!(written, ranges, "one file per range was written or tried");
    let left = common::files_ending_with(dir.path(), ".parquet");
    assert!(left.is_empty(), "the other ranges' files are deleted: {left:?}");
    assert_eq!(user.last_batch("s").await.expect("mark"), 0);

    let c = user.append("s", 1, vec![batch]).await.expect("append");
    assert_eq!(c.rows, 40);
    let files = common::files_ending_with(dir.path(), ".parquet");
    assert_eq!(files.len(), ranges, "one file per range: {files:?}");
    let mut back: Vec<(i32, usize, u8)> = Vec::new();
    for b in user.read_all().await.expect("read") {
        let id = b.column(0).as_any().downcast_ref::<Int32Array>().expect("ids");
        let payload = b.column(1).as_any().downcast_ref::<LargeBinaryArray>().expect("payloads");
        for r in 0..b.num_rows() {
            let v = payload.value(r);
            assert!(v.iter().all(|&x| x == v[0]), "row {} is whole", id.value(r));
            back.push((id.value(r), v.len(), v[0]));
        }
        assert_eq!(payload.null_count(), 0);
    }
    back.sort_unstable();
    let expected: Vec<(i32, usize, u8)> = ids.iter().map(|&i| (i, 1 << 20, i as u8)).collect();
    assert_eq!(back, expected, "every row once, whole");
}

/// A user-table append whose commit landed but whose reply was lost reads its own stream mark
/// back on the next attempt: it reports its rows and its snapshot, not "a replay, 0 rows"
/// (a pipeline counting rows committed would lose them from its count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_table_append_whose_reply_was_lost_reports_its_rows() {
    user_table_appends_under_lost_replies(false).await;
}

/// The same on a table whose iceberg commit retry is on (a table another engine created keeps
/// `commit.retry.num-retries`) and a catalog whose lost replies say "retry": every dotdo attempt
/// is one catalog call. iceberg's own retry re-sent a commit that had landed on its stale base,
/// got a conflict, and the append took that for "did not land": its next attempt found its
/// batch marked and deleted the data files of the snapshot that landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iceberg_commit_retries_never_turn_a_landed_user_table_commit_into_a_conflict() {
    user_table_appends_under_lost_replies(true).await;
}

async fn user_table_appends_under_lost_replies(retryable: bool) {
    use arrow_array::{Int32Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = dotdo_iceberg::catalog::default_sqlite_uri(dir.path());
    let (build, lossy) = common::lossy_sql_catalog_with(uri, format!("file://{}", dir.path().display()), 5, retryable);
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .catalog(dotdo_iceberg::CatalogConfig::Custom(build))
        .table(["lossy"], "changes")
        .settings(dotdo_iceberg::Settings { max_commit_attempts: 8, ..Default::default() })
        .build()
        .await
        .expect("open");
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false)]));
    let user = cold.arrow_table(&["lossy"], "events", schema.clone()).await.expect("user table");
    if retryable {
        // iceberg's default commit retries, as on a table dotdo did not create.
        for _ in 0..20 {
            let t = cold.catalog().load_table(user.ident()).await.expect("load");
            if t.metadata().properties().get("commit.retry.num-retries").map(String::as_str) == Some("4") {
                break;
            }
            let tx = iceberg::transaction::Transaction::new(&t);
            let props = tx.update_table_properties().set("commit.retry.num-retries".into(), "4".into());
            let tx = iceberg::transaction::ApplyTransactionAction::apply(props, tx).expect("apply");
            let _ = tx.commit(&*cold.catalog()).await;
        }
        // The premise: the table has iceberg's own retry on (else this is the case above).
        let t = cold.catalog().load_table(user.ident()).await.expect("load");
        let retries = t.metadata().properties().get("commit.retry.num-retries").cloned();
        assert_eq!(retries.as_deref(), Some("4"), "iceberg's commit retry is on");
    }
    let mut snapshots = std::collections::BTreeSet::new();
    for id in 1..=40u64 {
        let rows =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int32Array::from(vec![id as i32; 3]))]).expect("batch");
        let c = user.append("s", id, vec![rows]).await.expect("append (the attempts outlast the faults)");
        assert_eq!(c.rows, 3, "batch {id}: this call committed it");
        let snap = c.snapshot.expect("its snapshot");
        assert!(snapshots.insert(snap), "batch {id}: snapshot {snap} reported twice");
    }
    let cat = lossy.lock().clone().expect("catalog built");
    assert!(cat.lost.load(Ordering::SeqCst) >= 3, "too few lost replies: {}", cat.lost.load(Ordering::SeqCst));
    assert_eq!(user.last_batch("s").await.expect("mark"), 40);
    // Each reported snapshot is the one that carries its batch.
    let t = cold.catalog().load_table(user.ident()).await.expect("load");
    assert_eq!(t.metadata().snapshots().count(), 40, "one snapshot per batch");
    for s in t.metadata().snapshots().filter(|s| s.summary().operation == iceberg::spec::Operation::Append) {
        assert!(snapshots.contains(&s.snapshot_id()), "snapshot {} not reported", s.snapshot_id());
    }
    let ids: usize = user.read_all().await.expect("every data file there").iter().map(RecordBatch::num_rows).sum();
    assert_eq!(ids, 120, "every row once");
}

#[test]
fn builder_debug_redacts_store_credentials() {
    let b = IcebergColdStore::builder("s3://bucket/wh")
        .option("aws_access_key_id", "AKIDEXAMPLE")
        .option("aws_secret_access_key", "very-secret-value");
    let dbg = format!("{b:?}");
    assert!(dbg.contains("aws_secret_access_key"), "{dbg}");
    assert!(!dbg.contains("very-secret-value") && !dbg.contains("AKIDEXAMPLE"), "{dbg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_records_are_rejected_and_nothing_is_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("open");
    let o = ObjectId::new("o").expect("id");
    let mut bad_key = put(&o, 1, "ok", "v", 1);
    bad_key.key = "bad\u{7}key".into();
    let mut bad_type = put(&o, 1, "k", "v", 1);
    bad_type.type_name = String::new();
    let mut too_big = put(&o, 1, "k", "", 1);
    too_big.value = bytes::Bytes::from(vec![0u8; dotdo_core::MAX_VALUE_BYTES + 1]);
    for (what, r) in [("control char in key", bad_key), ("empty type", bad_type), ("value over 2 MiB", too_big)] {
        let batch = ColdBatch::single(
            o.clone(),
            FencingToken::new(1),
            vec![put(&o, 1, "a", "v", 1), {
                let mut r = r;
                r.seq = 2;
                r
            }],
        );
        let e = cold.append(batch).await.expect_err(what);
        assert!(matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::LimitExceeded { .. }), "{what}: {e}");
    }
    assert!(cold.snapshots().await.expect("snapshots").is_empty());
    assert_eq!(cold.watermark(&o).await.expect("wm").through, 0);
    // Nothing was left behind either: no data files.
    let data = dir.path().join("dotdo").join("changes").join("data");
    let files = std::fs::read_dir(&data).map(|d| d.count()).unwrap_or(0);
    assert_eq!(files, 0, "rejected batches leave no data files in {}", data.display());
}

/// Compaction under injected store faults (failed and delayed puts/gets, lost replies): rounds
/// of a few appends then a compaction, both through the faulty store; every compaction either
/// commits or fails with a typed error, and at the end every acknowledged record is there
/// exactly once, every snapshot's files exist, and the latest snapshot reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_under_injected_store_faults_loses_and_duplicates_nothing() {
    let target = common::fault_target();
    let seed: u64 = std::env::var("DOTDO_FAULT_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x0c0_4ac7);
    let dir = tempfile::tempdir().expect("tempdir");
    let local: Arc<dyn ObjectStore> = Arc::new(object_store::local::LocalFileSystem::new());
    let faulty = Arc::new(FaultyStore::new(local, seed, 0.05));
    faulty.set_enabled(false);
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .object_store(faulty.clone())
        .table(["faults"], "compacted")
        // A clock nobody advances: retries back off in real time.
        .with_clock(Arc::new(dotdo_core::ManualClock::new(dotdo_core::testkit::KIT_EPOCH)))
        .settings(dotdo_iceberg::Settings { buckets: 2, max_commit_attempts: 3, ..Default::default() })
        .build()
        .await
        .expect("open");
    faulty.set_enabled(true);
    let objects: Vec<ObjectId> = (0..3).map(|i| ObjectId::new(format!("obj-{i}")).expect("id")).collect();
    let mut next_seq: BTreeMap<ObjectId, u64> = objects.iter().map(|o| (o.clone(), 1)).collect();
    let (mut compacted, mut failed, mut round) = (0u64, BTreeMap::<&'static str, u64>::new(), 0u64);
    // Faults delivered during compactions (not the appends between them): (failures, lost
    // replies), and failed writes by kind of file.
    let (mut in_compaction, mut compaction_puts) = ((0u64, 0u64), BTreeMap::<&'static str, (u64, u64)>::new());
    while faulty.injected.load(Ordering::SeqCst) < target {
        round += 1;
        assert!(round < 2_000, "too many rounds without reaching {target} faults");
        for i in 0..3u64 {
            let o = &objects[((round + i) % 3) as usize];
            let s = next_seq[o];
            let batch =
                ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(o, s, &format!("k{}", s % 4), "v", 1)]);
            let mut tries = 0;
            loop {
                tries += 1;
                assert!(tries < 200, "batch never acknowledged");
                match cold.append(batch.clone()).await {
                    Ok(_) => {
                        next_seq.insert(o.clone(), s + 1);
                        break;
                    }
                    Err(e) => assert!(
                        matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::AmbiguousOutcome | ErrorKind::Conflict),
                        "unexpected append error under store faults: {e}"
                    ),
                }
            }
        }
        let before = (faulty.injected.load(Ordering::SeqCst), faulty.lost_replies.load(Ordering::SeqCst));
        let puts_before = faulty.put_faults.lock().clone();
        let outcome = cold.compact(dotdo_iceberg::CompactOptions::default()).await;
        in_compaction.0 += faulty.injected.load(Ordering::SeqCst) - before.0;
        in_compaction.1 += faulty.lost_replies.load(Ordering::SeqCst) - before.1;
        for (kind, (n, lost)) in faulty.put_faults.lock().iter() {
            let (n0, lost0) = puts_before.get(kind).copied().unwrap_or_default();
            let e = compaction_puts.entry(kind).or_default();
            e.0 += n - n0;
            e.1 += lost - lost0;
        }
        match outcome {
            Ok(r) => compacted += u64::from(r.snapshot.is_some()),
            Err(e) => {
                assert!(
                    matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::AmbiguousOutcome | ErrorKind::Conflict),
                    "unexpected compaction error under store faults: {e}"
                );
                if std::env::var_os("DOTDO_FAULT_VERBOSE").is_some() {
                    println!("compaction failed: {e}");
                }
                *failed.entry(e.kind().name()).or_default() += 1;
            }
        }
    }
    faulty.set_enabled(false);
    println!(
        "compaction fault test: {round} rounds, {compacted} compactions committed, failures {failed:?}, {} failures injected ({} lost replies), {} delays",
        faulty.injected.load(Ordering::SeqCst),
        faulty.lost_replies.load(Ordering::SeqCst),
        faulty.delays.load(Ordering::SeqCst)
    );
    println!(
        "  during compactions: {} failures ({} lost replies); failed writes by kind (failures, lost replies): {compaction_puts:?}",
        in_compaction.0, in_compaction.1
    );
    assert!(compacted > 0, "no compaction committed under faults");
    assert!(failed.values().sum::<u64>() > 0, "no injected failure reached a compaction");
    // The faults reached the compactions themselves, writes and lost replies included (not
    // only the appends between them).
    assert!(in_compaction.0 >= target / 4, "only {} of the faults hit compactions", in_compaction.0);
    let writes: u64 = compaction_puts.values().map(|(n, _)| n).sum();
    let lost_writes: u64 = compaction_puts.values().map(|(_, lost)| lost).sum();
    assert!(writes >= 5, "only {writes} failed writes in compactions: {compaction_puts:?}");
    assert!(lost_writes >= 2, "only {lost_writes} file writes in compactions lost their reply: {compaction_puts:?}");
    // Every replace snapshot in the table is a compaction reported committed: none that
    // failed (for its caller) landed anyway, none landed twice.
    let table = cold.refresh().await.expect("refresh");
    let replaces =
        table.metadata().snapshots().filter(|s| s.summary().operation == iceberg::spec::Operation::Replace).count()
            as u64;
    assert_eq!(replaces, compacted, "replace snapshots in the table vs compactions reported committed");
    // The live files hold every appended row once: a faulted compaction that left a replaced
    // file live, or listed its new file twice, doubles rows that reads (one row per sequence
    // number) and the clean compaction below would hide.
    let appended: u64 = next_seq.values().map(|n| n - 1).sum();
    assert_eq!(common::live_rows(&cold).await, appended, "rows stored twice or lost by compactions");
    // A clean final compaction, then everything reads back exactly once.
    cold.compact(dotdo_iceberg::CompactOptions::default()).await.expect("clean compaction");
    for o in &objects {
        let want = next_seq[o] - 1;
        assert_eq!(cold.watermark(o).await.expect("watermark").through, want);
        let seqs: Vec<u64> = cold.read_changes(o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=want).collect::<Vec<_>>(), "{o}: rows lost or doubled");
        assert_eq!(cold.load_state(o, AsOf::Latest).await.expect("state").through, want);
    }
    assert!(assert_no_missing_files(&cold, &faulty, true).await > 0);
    assert_eq!(common::live_rows(&cold).await, appended, "rows stored twice or lost by the clean compaction");
}

/// Every manifest list, manifest and data file a snapshot of `cold` references exists (with
/// `live_only`, data files of DELETED entries, which compaction records, are not required).
/// Returns the number of data-file entries checked.
async fn assert_no_missing_files(cold: &IcebergColdStore, faulty: &Arc<FaultyStore>, live_only: bool) -> usize {
    let table = cold.refresh().await.expect("refresh");
    let root = dotdo_iceberg::StoreRoot::from_store(faulty.clone(), cold.warehouse()).expect("root");
    let mut checked = 0;
    // Appends carry manifests forward: check each distinct manifest once.
    let mut seen = std::collections::HashSet::new();
    for s in table.metadata().snapshots() {
        let list = table.manifest_list_reader(s).load().await.expect("manifest list exists");
        for mf in list.entries() {
            if !seen.insert(mf.manifest_path.clone()) {
                continue;
            }
            let m = mf.load_manifest(table.file_io()).await.expect("manifest exists");
            for e in m.entries().iter().filter(|e| !live_only || e.is_alive()) {
                let key = root.key(e.data_file().file_path()).expect("key");
                faulty
                    .head(&key)
                    .await
                    .unwrap_or_else(|err| panic!("snapshot {} references a missing file: {err}", s.snapshot_id()));
                checked += 1;
            }
        }
    }
    checked
}

/// Damaged metadata whose snapshot parents form a cycle gives `Corrupt`, never an endless walk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_parent_cycle_is_corrupt_not_a_hang() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, o) = store_with_puts(dir.path(), 2).await;
    let table = cold.refresh().await.expect("refresh");
    let head = table.metadata().current_snapshot_id().expect("head");
    common::edit_metadata(table.metadata_location().expect("metadata"), |json| {
        for s in json["snapshots"].as_array_mut().expect("snapshots") {
            if s["snapshot-id"].as_i64() != Some(head) {
                s["parent-snapshot-id"] = serde_json::json!(head); // the first snapshot's parent is the head
            }
        }
    });
    let checks = async {
        let fresh = match IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await {
            Ok(f) => f,
            Err(e) => {
                assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
                return;
            }
        };
        let e = fresh.snapshots().await.expect_err("loop");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("loops"), "{e}");
        let e = fresh.load_state(&o, AsOf::Timestamp(Timestamp::from_micros(1))).await.expect_err("loop");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        // Expiry too (keeping every snapshot by count, expiring by age): its walk of the head's
        // ancestors never awaits, so it runs on a task of its own, and the timeout is on its
        // handle (a timeout on the walk itself would never get to fire).
        for retain_last in [usize::MAX, 1] {
            let expiring = tokio::spawn({
                let fresh = fresh.clone();
                async move { fresh.expire_snapshots(std::time::Duration::ZERO, retain_last).await }
            });
            let e = tokio::time::timeout(std::time::Duration::from_secs(30), expiring)
                .await
                .expect("expiry ends")
                .expect("no panic")
                .expect_err("loop");
            assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), checks).await.expect("no endless walk");
}

/// Another process holds the SQL catalog's write lock: each commit's pointer swap waits out the
/// catalog's busy timeout, fails, and is read back at its base, so it certainly did not land.
/// The append gives up after two such attempts with a retryable `Unavailable` (it made 16
/// attempts, each an "unknown outcome", about 80 s, and kept every attempt's files), and
/// appends once the lock is gone, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_behind_a_locked_catalog_is_unavailable_in_bounded_time() {
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["m"], "changes")
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "v", 1)]))
        .await
        .expect("append");
    let holder = rusqlite::Connection::open(dir.path().join("catalog.db")).expect("catalog db");
    holder.execute_batch("BEGIN IMMEDIATE").expect("take the catalog's write lock");
    let batch = ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 2, "k", "w", 1)]);
    let clock = dotdo_core::SystemClock::new();
    let started = clock.monotonic();
    let e = cold.append(batch.clone()).await.expect_err("the catalog is locked");
    let took = clock.monotonic().saturating_sub(started);
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable(), "{e}");
    assert!(took < Duration::from_secs(30), "gave up after {took:?}");
    holder.execute_batch("COMMIT").expect("release");
    assert_eq!(cold.append(batch).await.expect("after the lock").records_written, 1);
    let seqs: Vec<u64> = cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2]);
}

/// A replay (a batch with nothing new) from a writer whose known table is stale is answered from
/// the current table: a higher token committed since by another store fences it, as the
/// reference sink does (it was `Ok` with the stale watermarks of its own table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_on_a_stale_table_is_fenced_by_a_newer_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).table(["m"], "changes").build();
    let (a, b) = (open().await.expect("a"), open().await.expect("b"));
    let o = ObjectId::new("o").expect("id");
    let first =
        ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "v", 1), put(&o, 2, "k", "w", 1)]);
    a.append(first.clone()).await.expect("a commits 1..2");
    b.append(ColdBatch::single(o.clone(), FencingToken::new(2), vec![put(&o, 3, "k", "x", 2)]))
        .await
        .expect("b commits 3 under a newer token");
    let e = a.append(first).await.expect_err("a's replay under its old token");
    assert!(matches!(e.kind(), ErrorKind::Fenced { .. }), "{e}");
}

/// A stale writer whose known table predates a newer token writes its files, loses the swap, and
/// is fenced on the fresher table: its data files are deleted (nothing can reference them; they
/// stayed until a cleanup found them old enough, a batch's worth per stale drain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_fenced_after_a_lost_swap_leaves_no_data_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).table(["m"], "changes").build();
    let (a, b) = (open().await.expect("a"), open().await.expect("b"));
    let o = ObjectId::new("o").expect("id");
    a.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "v", 1)])).await.expect("a: 1");
    b.append(ColdBatch::single(o.clone(), FencingToken::new(2), vec![put(&o, 2, "k", "w", 2)])).await.expect("b: 2");
    let data = || common::files_ending_with(dir.path(), ".parquet").len();
    assert_eq!(data(), 2);
    let stale =
        ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 2, "k", "x", 1), put(&o, 3, "k", "y", 1)]);
    let e = a.append(stale).await.expect_err("a's token is below b's");
    assert!(matches!(e.kind(), ErrorKind::Fenced { .. }), "{e}");
    assert_eq!(data(), 2, "the fenced attempt's data files are deleted");
    let seqs: Vec<u64> = a.read_changes(&o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2]);
}

/// Every single damaged byte in a data file's pages (each of them flipped in turn) gives a read
/// that answers or fails with `Corrupt` naming the file; none panics (parquet 58 asserts on some
/// damaged bit widths, and a read took its task down). Parquet pages carry no checksums here
/// (parquet 58 writes none), so some flips go unnoticed and answer other values (or, in a bloom
/// filter, hide a row from a lookup): counted, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_bytes_in_a_data_file_never_panic_a_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, o) = forty_puts_committed(dir.path()).await;
    let good = cold.load_state(&o, AsOf::Latest).await.expect("state").entries;
    let good_key3 = good.iter().find(|e| e.key == "key-3").map(|e| e.value.clone());
    assert!(good_key3.is_some(), "key-3 is live");
    let (_, file) = first_data_file(&cold).await;
    let local = file.strip_prefix("file://").expect("local").to_string();
    let name = file.rsplit('/').next().expect("name").to_string();
    let bytes = std::fs::read(&local).expect("read");
    let footer = u32::from_le_bytes(bytes[bytes.len() - 8..bytes.len() - 4].try_into().expect("4 bytes")) as usize;
    let pages = 4..bytes.len() - 8 - footer;
    let (mut same, mut differ, mut corrupt, mut panicked, mut lookups_differ) = (0, 0, 0, 0, 0);
    for pos in pages {
        let mut damaged = bytes.clone();
        damaged[pos] ^= 0x5a;
        std::fs::write(&local, &damaged).expect("write");
        let fresh = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("reopen");
        let lookup = dotdo_core::IndexAccelerator::lookup(&fresh, &o, "key-3", AsOf::Latest).await;
        let lookup = lookup.map(|l| l.value.map(|v| v.value) == good_key3);
        lookups_differ += usize::from(matches!(lookup, Ok(false)));
        let reads = [fresh.load_state(&o, AsOf::Latest).await.map(|s| s.entries == good), lookup];
        for r in reads {
            match r {
                Ok(true) => same += 1,
                Ok(false) => differ += 1,
                Err(e) => {
                    assert_eq!(e.kind(), &ErrorKind::Corrupt, "byte {pos}: {e}");
                    assert!(e.to_string().contains(&name), "byte {pos}: the error names the file: {e}");
                    corrupt += 1;
                    panicked += usize::from(e.to_string().contains("panicked"));
                }
            }
        }
    }
    std::fs::write(&local, &bytes).expect("restore");
    println!(
        "damaged bytes: {same} reads unchanged, {differ} changed unnoticed ({lookups_differ} of them lookups), \
         {corrupt} Corrupt ({panicked} from a decoder panic)"
    );
    assert!(corrupt > 0, "no damage was noticed at all");
    assert!(panicked > 0, "no damaged byte made the decoder panic: the reads' panic guards were not exercised");
}

/// A compaction that meets a data file whose damage makes the Parquet decoder panic is `Corrupt`
/// naming the file (it was `Backend`, "decoding … panicked", from the failed blocking task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_over_a_file_that_panics_the_decoder_is_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = dotdo_iceberg::Settings { buckets: 1, ..Default::default() };
    let open = || IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).settings(settings.clone()).build();
    let cold = open().await.expect("open");
    let o = ObjectId::new("o").expect("id");
    let records = forty_puts(&o);
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), records)).await.expect("append");
    let (_, file) = first_data_file(&cold).await;
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 41, "k", "v", 1)]))
        .await
        .expect("a second file");
    let local = file.strip_prefix("file://").expect("local").to_string();
    let name = file.rsplit('/').next().expect("name").to_string();
    let bytes = std::fs::read(&local).expect("read");
    damage_until_the_decoder_panics(local.as_ref(), &bytes, || async {
        open().await.expect("reopen").load_state(&o, AsOf::Latest).await.map(|_| ())
    })
    .await;
    let e = open().await.expect("reopen").compact(dotdo_iceberg::CompactOptions::default()).await.expect_err("damaged");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains(&name), "the error names the file: {e}");
}

/// Single damaged bytes of a manifest list and of a manifest (every other one, flipped in turn) give
/// reads that answer or fail with a typed error; none panics (apache-avro 0.21 unwraps the
/// parse of a damaged file's embedded schema names, and the read took its task down). A damaged
/// file location the store cannot map reads as `InvalidInput` (as a table whose files live
/// elsewhere does); every other failure is `Corrupt`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_bytes_in_manifests_never_panic_a_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, o) = forty_puts_committed(dir.path()).await;
    let table = cold.refresh().await.expect("refresh");
    let snap = table.metadata().current_snapshot().expect("snapshot").clone();
    let list = table.manifest_list_reader(&snap).load().await.expect("list");
    let manifest = list.entries()[0].manifest_path.clone();
    let mut panicked = 0;
    for target in [snap.manifest_list().to_string(), manifest] {
        let local = target.strip_prefix("file://").expect("local").to_string();
        let bytes = std::fs::read(&local).expect("read");
        let (mut answered, mut corrupt, mut elsewhere) = (0, 0, 0);
        // Every other byte (every byte took 45 s in a debug build).
        for pos in (0..bytes.len()).step_by(2) {
            let mut damaged = bytes.clone();
            damaged[pos] ^= 0x5a;
            std::fs::write(&local, &damaged).expect("write");
            let fresh = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("reopen");
            let reads = [
                fresh.load_state(&o, AsOf::Latest).await.map(|_| ()),
                dotdo_core::IndexAccelerator::lookup(&fresh, &o, "key-3", AsOf::Latest).await.map(|_| ()),
                fresh.watermark(&o).await.map(|_| ()),
            ];
            for r in reads {
                match r {
                    Ok(()) => answered += 1,
                    Err(e) if e.kind() == &ErrorKind::InvalidInput => {
                        assert!(e.to_string().contains("not"), "byte {pos} of {target}: {e}");
                        elsewhere += 1;
                    }
                    Err(e) => {
                        assert_eq!(e.kind(), &ErrorKind::Corrupt, "byte {pos} of {target}: {e}");
                        panicked += usize::from(e.to_string().contains("panicked"));
                        corrupt += 1;
                    }
                }
            }
        }
        std::fs::write(&local, &bytes).expect("restore");
        println!("{target}: {} bytes, every other one damaged in turn: {answered} reads answered, {corrupt} Corrupt, {elsewhere} a location elsewhere", bytes.len());
        assert!(corrupt > 0, "no damage to {target} was noticed");
    }
    println!("{panicked} Corrupt from a decoder panic");
    assert!(panicked > 0, "no damaged byte made the decoder panic: the guard is not exercised");
}

/// An append through a catalog other than dotdo's SQL one (iceberg's own fast append reads the
/// parent's manifest list) onto a manifest list whose damage makes the Avro decoder panic is
/// `Corrupt`, not a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_onto_a_manifest_list_that_panics_the_decoder_is_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cold, _slot) = switched_store(dir.path()).await;
    let o = ObjectId::new("o").expect("id");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "v", 1)]))
        .await
        .expect("append");
    let table = cold.refresh().await.expect("refresh");
    let list = table.metadata().current_snapshot().expect("snapshot").manifest_list().to_string();
    let local = list.strip_prefix("file://").expect("local").to_string();
    let bytes = std::fs::read(&local).expect("read");
    damage_until_the_decoder_panics(local.as_ref(), &bytes, || async {
        let fresh = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("reopen");
        fresh.load_state(&o, AsOf::Latest).await.map(|_| ())
    })
    .await;
    let e = cold
        .append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 2, "k", "v", 1)]))
        .await
        .expect_err("the parent's manifest list is damaged");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains(list.rsplit('/').next().expect("name")), "the error names the file: {e}");
}

/// The user table `u.events` at `dir` (id, name), through a fresh store (no cached manifests).
async fn events_table(dir: &std::path::Path) -> dotdo_iceberg::ArrowTable {
    use arrow_schema::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, false),
    ]));
    let cold = IcebergColdStore::builder(dir.to_str().expect("utf-8")).build().await.expect("open");
    cold.arrow_table(&["u"], "events", schema).await.expect("table")
}

/// [`events_table`] with two appends of 50 rows each (two data files).
async fn user_table_of_two_files(dir: &std::path::Path) {
    use arrow_array::{Int64Array, RecordBatch, StringArray};
    let user = events_table(dir).await;
    let schema = user.schema();
    {
        for b in 0..2i64 {
            let ids: Vec<i64> = (b * 50..b * 50 + 50).collect();
            let names: Vec<String> = ids.iter().map(|i| format!("name number {i}")).collect();
            let rows = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from(ids)), Arc::new(StringArray::from(names))],
            )
            .expect("batch");
            user.append("s", u64::try_from(b + 1).expect("id"), vec![rows]).await.expect("append");
        }
    }
}

/// The files under a user table's directory whose names end with `suffix`.
fn user_table_files(dir: &std::path::Path, sub: &str, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(dir.join("u").join("events").join(sub))
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    out
}

/// A user-table read over a data file whose footer is damaged (its closing magic bytes) is
/// `Corrupt` naming that file: iceberg's "Failed to load Parquet metadata" names none, and
/// `read_all` reads many files at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_table_read_over_a_damaged_footer_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    user_table_of_two_files(dir.path()).await;
    let files = user_table_files(dir.path(), "data", ".parquet");
    assert_eq!(files.len(), 2, "{files:?}");
    for damaged in &files {
        let good = std::fs::read(damaged).expect("read");
        let mut bytes = good.clone();
        let n = bytes.len();
        bytes[n - 4..].copy_from_slice(b"XXXX");
        std::fs::write(damaged, &bytes).expect("damage");
        let user = events_table(dir.path()).await;
        let e = user.read_all().await.expect_err("a damaged footer");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        let name = damaged.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(e.to_string().contains(name), "names {name}: {e}");
        std::fs::write(damaged, &good).expect("mend");
    }
}

/// A user-table scan over a manifest whose damage makes the Avro decoder panic is `Corrupt`:
/// iceberg plans the scan on tasks of its own, and the panicking one ended the plan short
/// without an error, so `read_all` answered `Ok` with part of the table. Every third byte of
/// the first manifest is damaged in turn; each read answers all 100 rows or fails with a typed
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_table_scan_over_a_damaged_manifest_never_answers_part_of_the_table() {
    use arrow_array::RecordBatch;
    let dir = tempfile::tempdir().expect("tempdir");
    user_table_of_two_files(dir.path()).await;
    let manifests: Vec<_> = user_table_files(dir.path(), "metadata", ".avro")
        .into_iter()
        .filter(|p| !p.file_name().expect("name").to_string_lossy().starts_with("snap-"))
        .collect();
    assert_eq!(manifests.len(), 2, "{manifests:?}");
    let (mut whole, mut refused, mut panicked) = (0, 0, 0);
    for manifest in &manifests[..1] {
        let bytes = std::fs::read(manifest).expect("read");
        for pos in (0..bytes.len()).step_by(3) {
            let mut damaged = bytes.clone();
            damaged[pos] ^= 0x5a;
            std::fs::write(manifest, &damaged).expect("write");
            match events_table(dir.path()).await.read_all().await {
                Ok(b) => {
                    assert_eq!(
                        b.iter().map(RecordBatch::num_rows).sum::<usize>(),
                        100,
                        "byte {pos}: part of the table"
                    );
                    whole += 1;
                }
                Err(e) => {
                    assert!(matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::InvalidInput), "byte {pos}: {e}");
                    panicked += usize::from(e.to_string().contains("panicked") || e.to_string().contains("planned"));
                    refused += 1;
                }
            }
        }
        std::fs::write(manifest, &bytes).expect("restore");
    }
    println!("user-table manifests damaged: {whole} reads whole, {refused} refused ({panicked} after a decoder panic)");
    assert!(panicked > 0, "no damaged byte made the decoder panic: the check is not exercised");
}

/// A user-table compaction over a data file whose damage makes the Parquet decoder panic is
/// `Corrupt` naming the files it read (the panic took the caller's task down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_table_compaction_over_a_file_that_panics_the_decoder_is_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    user_table_of_two_files(dir.path()).await;
    let file = user_table_files(dir.path(), "data", ".parquet").remove(0);
    let bytes = std::fs::read(&file).expect("read");
    damage_until_the_decoder_panics(&file, &bytes, || async {
        events_table(dir.path()).await.read_all().await.map(|_| ())
    })
    .await;
    let user = events_table(dir.path()).await;
    let e = user.compact(dotdo_iceberg::CompactOptions::default()).await.expect_err("damaged");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    let name = file.file_name().expect("name").to_string_lossy().to_string();
    assert!(e.to_string().contains(&name), "the error names the file: {e}");
}

/// Damage `file` (whose intact content is `bytes`) one byte at a time, from the start, until
/// `read` fails saying the decoder panicked; the file is left with that damage. Panics if no
/// single damaged byte does.
async fn damage_until_the_decoder_panics<F, Fut>(file: &std::path::Path, bytes: &[u8], read: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = dotdo_core::Result<()>>,
{
    for pos in 0..bytes.len() {
        let mut damaged = bytes.to_vec();
        damaged[pos] ^= 0x5a;
        std::fs::write(file, &damaged).expect("write");
        if read().await.is_err_and(|e| e.to_string().contains("panicked")) {
            return;
        }
    }
    panic!("no damaged byte of {} made the decoder panic", file.display());
}

/// A reload whose answer predates a commit the store acknowledged meanwhile does not take the
/// store's known table back past that commit: with `refresh_reads` off, reads still see the
/// store's own acknowledged commit. (A maintenance call's or a read's reload, racing a flush,
/// put the older table back, and reads missed the flushed changes until the next commit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reload_does_not_hide_a_commit_acknowledged_meanwhile() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = dotdo_iceberg::catalog::default_sqlite_uri(dir.path());
    let (build, slot) = common::switched_sql_catalog(uri, format!("file://{}", dir.path().display()));
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .catalog(dotdo_iceberg::CatalogConfig::Custom(build))
        .settings(dotdo_iceberg::Settings { refresh_reads: false, ..Default::default() })
        .build()
        .await
        .expect("open");
    let catalog = slot.lock().clone().expect("catalog built");
    let o = ObjectId::new("o").expect("id");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "one", 1)]))
        .await
        .expect("first commit");
    let release = Arc::new(tokio::sync::Notify::new());
    *catalog.hold_next_load.lock() = Some(release.clone());
    let reloading = tokio::spawn({
        let cold = cold.clone();
        async move { cold.refresh().await }
    });
    while !catalog.load_held.load(std::sync::atomic::Ordering::SeqCst) {
        tokio::task::yield_now().await;
    }
    let c = cold
        .append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 2, "k", "two", 1)]))
        .await
        .expect("second commit, while the reload is under way");
    release.notify_one();
    reloading.await.expect("task").expect("reload");
    assert_eq!(
        cold.table().metadata().current_snapshot().map(|s| s.snapshot_id()),
        c.snapshot,
        "the store's own commit"
    );
    assert_eq!(cold.watermark(&o).await.expect("watermark").through, 2);
    let state = cold.load_state(&o, AsOf::Latest).await.expect("state");
    assert_eq!(state.entries.iter().map(|e| &e.value[..]).collect::<Vec<_>>(), [&b"two"[..]]);
}

/// A store without `refresh_reads` whose known head was expired by another store, and whose
/// watermark checkpoint was then cleaned up, reads the watermarks of the current table, as its
/// latest-state reads do. (`watermarks` and `watermark` answered `Corrupt`, "checkpoint
/// missing", for a table that is whole, until something refreshed the store.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermarks_on_a_stale_table_whose_checkpoint_was_cleaned_up_read_the_current_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = || dotdo_iceberg::Settings { watermark_checkpoint_objects: 0, ..Default::default() };
    let open = |refresh_reads| {
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .settings(dotdo_iceberg::Settings { refresh_reads, ..settings() })
            .build()
    };
    let b = open(true).await.expect("open b");
    let o = ObjectId::new("o").expect("id");
    b.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 1, "k", "one", 1)]))
        .await
        .expect("first commit");
    let checkpoints = || -> Vec<_> {
        common::files_ending_with(dir.path(), ".json")
            .into_iter()
            .filter(|p| p.to_string_lossy().contains("dotdo-watermarks-"))
            .collect()
    };
    let first_checkpoints = checkpoints();
    assert_eq!(first_checkpoints.len(), 1, "{first_checkpoints:?}");
    let a = open(false).await.expect("open a: it knows the first commit");
    let a2 = open(false).await.expect("open another: it knows the first commit");
    b.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![put(&o, 2, "k", "two", 1)]))
        .await
        .expect("second commit");
    b.expire_snapshots(std::time::Duration::ZERO, 1).await.expect("expire the first");
    // What a cleanup does once the retention has passed: the expired snapshot's checkpoint goes.
    std::fs::remove_file(&first_checkpoints[0]).expect("remove the first checkpoint");
    let marks = a.watermarks(std::slice::from_ref(&o)).await.expect("the current table's watermarks");
    assert_eq!(marks[0].through, 2);
    // `watermark` alone, on a store no read has refreshed yet.
    assert_eq!(a2.watermark(&o).await.expect("watermark").through, 2);
}

/// A store on a new local warehouse at `dir` whose SQL catalog loses a reply when armed
/// ([`common::switched_sql_catalog`]; commits then go through iceberg's `Transaction`), and the
/// slot holding that catalog once built.
async fn switched_store(
    dir: &std::path::Path,
) -> (IcebergColdStore, Arc<parking_lot::Mutex<Option<Arc<common::LossyCatalog>>>>) {
    let uri = dotdo_iceberg::catalog::default_sqlite_uri(dir);
    let (build, slot) = common::switched_sql_catalog(uri, format!("file://{}", dir.display()));
    let cold = IcebergColdStore::builder(dir.to_str().expect("utf-8"))
        .catalog(dotdo_iceberg::CatalogConfig::Custom(build))
        .build()
        .await
        .expect("open");
    (cold, slot)
}

/// A store on a new local warehouse at `dir` with [`forty_puts`] of object `o` committed.
async fn forty_puts_committed(dir: &std::path::Path) -> (IcebergColdStore, ObjectId) {
    let cold = IcebergColdStore::builder(dir.to_str().expect("utf-8")).build().await.expect("open");
    let o = ObjectId::new("o").expect("id");
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), forty_puts(&o))).await.expect("append");
    (cold, o)
}

/// Puts of `o` at seqs 1 to 40 over 13 keys, with values of some length (pages worth damaging).
fn forty_puts(o: &ObjectId) -> Vec<dotdo_core::ChangeRecord> {
    (1..=40u64).map(|s| put(o, s, &format!("key-{}", s % 13), &format!("value number {s}"), 1)).collect()
}

/// A large write through iceberg's `Storage::write` (a watermark checkpoint of millions of
/// objects) goes up in parts: a store that cannot take it in one request (a slow link under the
/// client's whole-request timeout) takes it. It was one PUT, failed on every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_write_goes_up_in_parts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FaultyStore::quiet_local();
    store.max_put_bytes.store(4 << 20, Ordering::SeqCst);
    let root = dotdo_iceberg::StoreRoot::from_store(store.clone(), dir.path().to_str().expect("utf-8")).expect("root");
    let storage = root.factory().build(&iceberg::io::StorageConfig::new()).expect("storage");
    let small = bytes::Bytes::from(vec![1u8; 1 << 20]);
    let small_at = format!("{}/ns/t/metadata/small", root.warehouse);
    storage.write(&small_at, small.clone()).await.expect("one put");
    let large = bytes::Bytes::from((0..24u32 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let large_at = format!("{}/ns/t/metadata/large", root.warehouse);
    storage.write(&large_at, large.clone()).await.expect("written in parts");
    assert_eq!(std::fs::read(dir.path().join("ns/t/metadata/large")).expect("read"), large);
    assert_eq!(std::fs::read(dir.path().join("ns/t/metadata/small")).expect("read"), small);
}
