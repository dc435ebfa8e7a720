//! Interop with PyIceberg 0.12: a table written by dotdo-iceberg over several commits and an
//! expiry is read by PyIceberg's `SqlCatalog`; every row matches dotdo's own reads, and a
//! time-travel read at an older snapshot matches dotdo's as-of read. Also covers snapshot
//! expiry with cleanup of unreferenced files honouring a retention period.

mod common;

use std::time::Duration;

use dotdo_core::{
    AsOf, ChangeRecord, ColdBatch, ColdSink, ErrorKind, FencingToken, IndexAccelerator, ObjectChanges, ObjectId, Op,
    Timestamp,
};
use dotdo_iceberg::IcebergColdStore;

type Row = (String, u64, String, String, String, u64, i64, String);

/// Runs a PyIceberg script to its end, for at most five minutes (a hung interpreter fails the
/// test naming `what` instead of holding CI).
fn py_output(cmd: &mut std::process::Command, what: &str) -> std::process::Output {
    dotdo_core::testkit::process::output_within(cmd, Duration::from_secs(300), what)
}

fn row(r: &ChangeRecord) -> Row {
    let hex: String = r.value.iter().map(|b| format!("{b:02x}")).collect();
    (
        r.object.to_string(),
        r.seq,
        r.key.clone(),
        r.op.as_str().to_string(),
        hex,
        r.token.get(),
        r.timestamp.as_micros(),
        r.type_name.clone(),
    )
}

fn rows_of(v: &serde_json::Value) -> Vec<Row> {
    let mut out: Vec<Row> = v
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            let r = r.as_array().expect("row");
            let s = |i: usize| r[i].as_str().expect("string").to_string();
            let n = |i: usize| r[i].as_u64().expect("u64");
            (s(0), n(1), s(2), s(3), s(4), n(5), r[6].as_i64().expect("i64"), s(7))
        })
        .collect();
    out.sort();
    out
}

async fn dotdo_rows(cold: &IcebergColdStore, objects: &[ObjectId], as_of: AsOf) -> Vec<Row> {
    let mut out = Vec::new();
    for o in objects {
        out.extend(cold.read_changes(o, 0, as_of).await.expect("read").iter().map(row));
    }
    out.sort();
    out
}

fn rec(o: &ObjectId, seq: u64, key: &str, value: Option<&[u8]>, token: u64) -> ChangeRecord {
    let mut r = common::put(o, seq, key, "", token);
    match value {
        Some(v) => r.value = bytes::Bytes::copy_from_slice(v),
        None => r.op = Op::Delete,
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyiceberg_reads_every_row_and_time_travels_like_dotdo_after_expiry() {
    let Some(python) = common::python("pyiceberg_reads_every_row_and_time_travels_like_dotdo_after_expiry") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["interop"], "changes")
        // No writer runs during this test's cleanup.
        .settings(dotdo_iceberg::Settings { min_cleanup_retention: Duration::ZERO, ..Default::default() })
        .build()
        .await
        .expect("open");
    let (a, b) = (ObjectId::new("user:a").expect("id"), ObjectId::new("order/b@1").expect("id"));
    let objects = vec![a.clone(), b.clone()];
    let binary: Vec<u8> = (0..=255u8).collect();
    let commits: Vec<ColdBatch> = vec![
        ColdBatch::single(
            a.clone(),
            FencingToken::new(1),
            vec![rec(&a, 1, "x", Some(b"1"), 1), rec(&a, 2, "y", Some(&binary), 1)],
        ),
        ColdBatch::single(b.clone(), FencingToken::new(3), vec![rec(&b, 1, "items", Some(b"[]"), 3)]),
        ColdBatch {
            objects: vec![
                ObjectChanges {
                    object: a.clone(),
                    token: FencingToken::new(2),
                    records: vec![rec(&a, 3, "x", None, 2)],
                },
                ObjectChanges {
                    object: b.clone(),
                    token: FencingToken::new(3),
                    records: vec![rec(&b, 2, "items", Some(b"[1]"), 3), rec(&b, 3, "total", Some(b""), 3)],
                },
            ],
        },
        ColdBatch::single(a.clone(), FencingToken::new(2), vec![rec(&a, 4, "x", Some("ünï".as_bytes()), 2)]),
    ];
    // What each commit wrote, as rows: the absolute answer both readers must give.
    let mut committed: Vec<Vec<Row>> =
        commits.iter().map(|c| c.objects.iter().flat_map(|oc| oc.records.iter().map(row)).collect()).collect();
    let mut snaps = Vec::new();
    for c in commits {
        snaps.push(cold.append(c).await.expect("append").snapshot.expect("snapshot"));
        common::sleep(Duration::from_millis(5)).await;
    }
    // Expire the oldest snapshot, clean up what nothing references any more.
    let table = cold.refresh().await.expect("refresh");
    let expired_list = table.metadata().snapshot_by_id(snaps[0]).expect("s1").manifest_list().to_string();
    let rep = cold.expire_snapshots(Duration::ZERO, 3).await.expect("expire");
    assert_eq!(rep.expired, vec![snaps[0]]);
    let clean = cold.remove_unreferenced_files(Duration::ZERO).await.expect("cleanup");
    assert!(clean.deleted.iter().any(|d| d.ends_with(expired_list.rsplit('/').next().expect("name"))), "{clean:?}");
    assert_eq!(cold.load_state(&a, AsOf::Snapshot(snaps[0])).await.expect_err("expired").kind(), &ErrorKind::NotFound);
    // Watermarks survive expiry; commits continue.
    assert_eq!(cold.watermark(&a).await.expect("wm").through, 4);
    let last_batch = ColdBatch::single(b.clone(), FencingToken::new(4), vec![rec(&b, 4, "items", None, 4)]);
    committed.push(last_batch.objects[0].records.iter().map(row).collect());
    let last = cold.append(last_batch).await.expect("append after expiry");
    snaps.push(last.snapshot.expect("snapshot"));

    let older = snaps[2];
    let out = py_output(
        std::process::Command::new(&python)
            .arg(common::py_dir().join("read_table.py"))
            .arg(dir.path().join("catalog.db"))
            .arg(cold.warehouse())
            .arg("interop.changes")
            .arg(older.to_string()),
        "run read_table.py",
    );
    assert!(out.status.success(), "pyiceberg failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json from read_table.py");
    assert_eq!(v["current"].as_i64(), Some(snaps[4]));
    let mut py_snaps: Vec<i64> = v["snapshots"].as_array().expect("ids").iter().filter_map(|x| x.as_i64()).collect();
    let ours: Vec<i64> = cold.snapshots().await.expect("snapshots").iter().map(|s| s.id).collect();
    assert_eq!(ours, snaps[1..].to_vec(), "dotdo lists the retained snapshots oldest first");
    py_snaps.sort_unstable();
    let mut ours_sorted = ours.clone();
    ours_sorted.sort_unstable();
    assert_eq!(py_snaps, ours_sorted, "same snapshots, the expired one gone");
    let sorted = |commits: &[Vec<Row>]| {
        let mut rows: Vec<Row> = commits.concat();
        rows.sort();
        rows
    };
    // Every row written, field by field (the expired snapshot's rows live on in the later ones).
    let all = sorted(&committed);
    assert_eq!(all.len(), 8);
    assert_eq!(rows_of(&v["latest"]), all, "PyIceberg's latest rows differ from what was written");
    // Another engine's Parquet reader (DuckDB's: its own decoder, not arrow's) reads the live
    // data files, timestamps and delta-encoded columns included.
    assert_eq!(rows_of(&v["duckdb_latest"]), all, "DuckDB's rows of the live data files differ");
    assert_eq!(
        dotdo_rows(&cold, &objects, AsOf::Latest).await,
        all,
        "dotdo's latest rows differ from what was written"
    );
    let as_of = sorted(&committed[..3]);
    assert_eq!(rows_of(&v["as_of"]), as_of, "PyIceberg's time-travel rows differ from commits 1-3");
    assert_eq!(dotdo_rows(&cold, &objects, AsOf::Snapshot(older)).await, as_of, "dotdo's as-of rows differ");
    // (`dotdo.watermarks-carried`: the inline watermarks repeated since the last checkpoint.)
    assert_eq!(
        v["summary_keys"],
        serde_json::json!(["dotdo.commit-id", "dotdo.committed-at-us", "dotdo.watermarks", "dotdo.watermarks-carried"])
    );
    let spec = v["partition_spec"].as_str().expect("spec");
    assert!(spec.contains("bucket[16]") && spec.contains("do_id"), "{spec}");
    // Time travel by time picks the same snapshot in both engines: a dotdo commit's Iceberg
    // `timestamp-ms` is its commit time (it was stamped a manifest write later, so PyIceberg at
    // dotdo's commit time could pick the parent).
    let travel = v["time_travel"].as_array().expect("time_travel");
    assert_eq!(travel.len(), 4, "{travel:?}");
    for t in travel {
        let (id, committed, ts_ms, picked) = (t[0].as_i64(), t[1].as_i64(), t[2].as_i64(), t[3].as_i64());
        let (id, committed) = (id.expect("id"), committed.expect("a dotdo commit time"));
        assert_eq!(ts_ms, Some(committed.div_euclid(1000)), "snapshot {id}: timestamp-ms is dotdo's commit time");
        assert_eq!(picked, Some(id), "PyIceberg at snapshot {id}'s commit time");
        let at = dotdo_core::Timestamp::from_micros(committed);
        let ours = cold.load_state(&a, AsOf::Timestamp(at)).await.expect("as of the commit time");
        assert_eq!(ours.snapshot, Some(id), "dotdo at snapshot {id}'s commit time");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_keeps_unreferenced_files_younger_than_the_retention_and_never_referenced_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || {
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .table(["gc"], "changes")
            // Every commit writes a watermark checkpoint: cleanup must keep the current one.
            .settings(dotdo_iceberg::Settings {
                watermark_checkpoint_objects: 0,
                min_cleanup_retention: Duration::ZERO,
                ..Default::default()
            })
            .build()
    };
    let cold = open().await.expect("open");
    let o = ObjectId::new("o").expect("id");
    for s in 1..=3 {
        cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![rec(&o, s, "k", Some(b"v"), 1)]))
            .await
            .expect("append");
    }
    // An orphan, as a crashed writer would leave it.
    let loc = cold.table().metadata().location().to_string();
    let data_dir = std::path::PathBuf::from(loc.strip_prefix("file://").expect("file url")).join("data");
    let orphan = data_dir.join("orphan-from-a-crash.parquet");
    std::fs::write(&orphan, b"not parquet").expect("write orphan");

    // Nothing is old enough: expiry and cleanup keep everything.
    assert!(cold.expire_snapshots(Duration::from_secs(3600), 1).await.expect("expire").expired.is_empty());
    let kept = cold.remove_unreferenced_files(Duration::from_secs(3600)).await.expect("cleanup");
    assert!(kept.deleted.is_empty(), "{kept:?}");
    assert!(kept.kept_recent >= 1);
    assert!(orphan.exists());

    common::sleep(Duration::from_millis(20)).await;
    let rep = cold.expire_snapshots(Duration::ZERO, 1).await.expect("expire");
    assert_eq!(rep.expired.len(), 2);
    assert_eq!(rep.retained, 1);
    let clean = cold.remove_unreferenced_files(Duration::ZERO).await.expect("cleanup");
    assert!(!orphan.exists(), "orphan older than the retention is deleted");
    assert!(clean.deleted.len() >= 3, "orphan + 2 manifest lists: {clean:?}");
    // Everything still referenced is intact: the full history of the object reads back.
    let seqs: Vec<u64> = cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(cold.snapshots().await.expect("snapshots").len(), 1);
    assert!(clean.deleted.iter().filter(|d| d.contains("dotdo-watermarks-")).count() >= 2, "{clean:?}");
    // A fresh store (no caches) still finds the watermark through the retained checkpoint.
    let reopened = open().await.expect("reopen");
    assert_eq!(reopened.watermark(&o).await.expect("watermark").through, 3);
}

/// PyIceberg reads a compacted table: the current snapshot's operation is `replace`, it has
/// fewer data files, and its rows equal dotdo's reads and the rows before the compaction (also
/// read by PyIceberg through time travel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyiceberg_reads_a_compacted_table_with_the_same_rows() {
    let Some(python) = common::python("pyiceberg_reads_a_compacted_table_with_the_same_rows") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["interop"], "compacted")
        .settings(dotdo_iceberg::Settings { buckets: 4, ..Default::default() })
        .build()
        .await
        .expect("open");
    let objects: Vec<ObjectId> = (0..6).map(|i| ObjectId::new(format!("acct:{i}")).expect("id")).collect();
    let mut seqs = vec![0u64; objects.len()];
    for round in 0..8u64 {
        let mut changes = Vec::new();
        for (i, o) in objects.iter().enumerate() {
            if (round + i as u64).is_multiple_of(3) {
                continue;
            }
            seqs[i] += 1;
            let value = (round % 4 != 3).then(|| format!("r{round}-{i}").into_bytes());
            changes.push(ObjectChanges {
                object: o.clone(),
                token: FencingToken::new(1),
                records: vec![rec(o, seqs[i], &format!("k{}", round % 3), value.as_deref(), 1)],
            });
        }
        cold.append(ColdBatch { objects: changes }).await.expect("append");
    }
    let before_rows = dotdo_rows(&cold, &objects, AsOf::Latest).await;
    let before = cold.refresh().await.expect("t").metadata().current_snapshot_id().expect("head");
    let report = cold.compact(dotdo_iceberg::CompactOptions::default()).await.expect("compact");
    let compacted = report.snapshot.expect("something to compact");
    assert!(report.files_removed > report.files_added, "{report:?}");

    let run = |as_of: i64| {
        py_output(
            std::process::Command::new(&python)
                .arg(common::py_dir().join("read_table.py"))
                .arg(dir.path().join("catalog.db"))
                .arg(cold.warehouse())
                .arg("interop.compacted")
                .arg(as_of.to_string()),
            "run read_table.py",
        )
    };
    let out = run(before);
    assert!(out.status.success(), "pyiceberg failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json from read_table.py");
    assert_eq!(v["current"].as_i64(), Some(compacted));
    assert_eq!(v["operation"].as_str(), Some("replace"));
    // Every partition had several files: one file per partition is left.
    assert!(report.files_added <= 4, "{report:?}");
    assert_eq!(v["data_files"].as_u64(), Some(report.files_added), "one file per partition after compaction");
    assert_eq!(rows_of(&v["latest"]), before_rows, "PyIceberg's rows after compaction");
    assert_eq!(rows_of(&v["as_of"]), before_rows, "PyIceberg's rows before compaction");
    assert_eq!(dotdo_rows(&cold, &objects, AsOf::Latest).await, before_rows, "dotdo's rows after compaction");
    assert_eq!(
        v["summary_keys"],
        serde_json::json!([
            "dotdo.commit-id",
            "dotdo.committed-at-us",
            "dotdo.maintenance",
            "dotdo.watermarks",
            "dotdo.watermarks-carried"
        ])
    );
}

/// Snapshots another engine named (a PyIceberg tag and branch) survive dotdo's expiry, which
/// used to fail on them (iceberg refuses to expire a ref's head), and stay readable after
/// cleanup; the rest of the old history is expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_keeps_snapshots_tagged_or_branched_by_pyiceberg() {
    let Some(python) = common::python("expiry_keeps_snapshots_tagged_or_branched_by_pyiceberg") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["interop"], "refs")
        .settings(dotdo_iceberg::Settings { min_cleanup_retention: Duration::ZERO, ..Default::default() })
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    let mut snaps = Vec::new();
    for seq in 1..=5u64 {
        let value = format!("v{seq}");
        let c = ColdBatch::single(o.clone(), FencingToken::new(1), vec![rec(&o, seq, "k", Some(value.as_bytes()), 1)]);
        snaps.push(cold.append(c).await.expect("append").snapshot.expect("snapshot"));
        common::sleep(Duration::from_millis(5)).await;
    }
    let out = py_output(
        std::process::Command::new(&python)
            .arg(common::py_dir().join("tag_snapshots.py"))
            .arg(dir.path().join("catalog.db"))
            .arg(cold.warehouse())
            .arg("interop.refs")
            .arg(snaps[0].to_string())
            .arg(snaps[2].to_string()),
        "run tag_snapshots.py",
    );
    assert!(out.status.success(), "tag_snapshots.py: {}", String::from_utf8_lossy(&out.stderr));
    let rep = cold.expire_snapshots(Duration::ZERO, 1).await.expect("expiry with refs present");
    assert_eq!(rep.expired, vec![snaps[3]], "tag at 1, branch at 3 with its ancestors 1-2, head 5");
    cold.remove_unreferenced_files(Duration::ZERO).await.expect("cleanup");
    for (i, want) in [(0, "v1"), (2, "v3"), (4, "v5")] {
        let st = cold.load_state(&o, AsOf::Snapshot(snaps[i])).await.expect("named snapshot readable");
        let values: Vec<&[u8]> = st.entries.iter().map(|e| &e.value[..]).collect();
        assert_eq!(values, [want.as_bytes()], "snapshot {i}");
    }
    assert_eq!(cold.load_state(&o, AsOf::Snapshot(snaps[3])).await.expect_err("expired").kind(), &ErrorKind::NotFound);
}

/// Another engine evolves the partition spec (bucket[16] to bucket[32] of do_id): files written
/// under the old spec are no longer pruned by the new spec's bucket (that lost about half the
/// objects' rows), appends continue under the new spec, and collapse refuses the mixed table
/// rather than splitting an object's history between groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_stay_complete_after_another_engine_evolves_the_partition_spec() {
    let Some(python) = common::python("reads_stay_complete_after_another_engine_evolves_the_partition_spec") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || async {
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .table(["interop"], "evolved")
            .build()
            .await
            .expect("open")
    };
    let cold = open().await;
    let objects: Vec<ObjectId> = (0..40).map(|i| ObjectId::new(format!("obj-{i}")).expect("id")).collect();
    let batch = |seq: u64, value: &str| common::one_value_each(&objects, seq, value);
    cold.append(batch(1, "old-spec")).await.expect("append under bucket[16]");
    let out = py_output(
        std::process::Command::new(&python)
            .arg(common::py_dir().join("evolve_spec.py"))
            .arg(dir.path().join("catalog.db"))
            .arg(cold.warehouse())
            .arg("interop.evolved"),
        "run evolve_spec.py",
    );
    assert!(out.status.success(), "evolve_spec.py: {}", String::from_utf8_lossy(&out.stderr));
    let before = cold;
    let cold = open().await;
    for o in &objects {
        let st = cold.load_state(o, AsOf::Latest).await.expect("state");
        assert_eq!(st.entries.len(), 1, "{o}: its row written under the old spec is found");
        let l = cold.lookup(o, "k", AsOf::Latest).await.expect("lookup");
        assert_eq!(l.value.map(|v| v.value), Some(bytes::Bytes::from_static(b"old-spec")), "{o}");
    }
    // A store opened before the evolution and one opened after both keep appending.
    before.append(batch(2, "old-handle")).await.expect("append from the handle opened before");
    cold.append(batch(3, "new-spec")).await.expect("append under bucket[32]");
    let cold = open().await;
    for o in &objects {
        let changes = cold.read_changes(o, 0, AsOf::Latest).await.expect("changes");
        assert_eq!(changes.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2, 3], "{o}");
        let l = cold.lookup(o, "k", AsOf::Latest).await.expect("lookup");
        assert_eq!(l.value.map(|v| v.value), Some(bytes::Bytes::from_static(b"new-spec")), "{o}");
    }
    let e = cold
        .collapse(dotdo_iceberg::CollapseOptions::new(Timestamp::from_micros(i64::MAX)))
        .await
        .expect_err("mixed specs");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
}

/// Another engine partitions the change table by `identity(do_id)`: a store opened after that
/// reads every object's rows (without pruning by bucket) and refuses appends (`InvalidInput`);
/// it refused to open, so a restarted node could read nothing of the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_another_engine_partitioned_otherwise_is_read_not_appended_to() {
    let Some(python) = common::python("a_table_another_engine_partitioned_otherwise_is_read_not_appended_to") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || async {
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).table(["interop"], "identity").build().await
    };
    let cold = open().await.expect("open");
    let objects: Vec<ObjectId> = (0..10).map(|i| ObjectId::new(format!("obj-{i}")).expect("id")).collect();
    let batch = |seq: u64| common::one_value_each(&objects, seq, "v");
    cold.append(batch(1)).await.expect("append under bucket[16]");
    let out = py_output(
        std::process::Command::new(&python)
            .arg(common::py_dir().join("evolve_spec.py"))
            .arg(dir.path().join("catalog.db"))
            .arg(cold.warehouse())
            .arg("interop.identity")
            .arg("identity"),
        "run evolve_spec.py",
    );
    assert!(out.status.success(), "evolve_spec.py: {}", String::from_utf8_lossy(&out.stderr));
    let cold = open().await.expect("a store opens the table");
    for o in &objects {
        assert_eq!(cold.load_state(o, AsOf::Latest).await.expect("state").entries.len(), 1, "{o}");
        let l = cold.lookup(o, "k", AsOf::Latest).await.expect("lookup");
        assert_eq!(l.value.map(|v| v.value), Some(bytes::Bytes::from_static(b"v")), "{o}");
    }
    let e = cold.append(batch(2)).await.expect_err("not partitioned by bucket(do_id)");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    // The engine partitions by bucket(do_id) again: this store appends, and reads (caching the
    // manifests' buckets). Then by another bucket count: the files of that append are still
    // found. Their cached buckets were compared under the newer spec, and skipped.
    let evolve = |to: &str| {
        let out = py_output(
            std::process::Command::new(&python)
                .arg(common::py_dir().join("evolve_spec.py"))
                .arg(dir.path().join("catalog.db"))
                .arg(cold.warehouse())
                .arg("interop.identity")
                .arg(to),
            "run evolve_spec.py",
        );
        assert!(out.status.success(), "evolve_spec.py {to}: {}", String::from_utf8_lossy(&out.stderr));
    };
    evolve("bucket:16");
    cold.append(batch(2)).await.expect("bucket(do_id) again");
    for o in &objects {
        assert_eq!(cold.read_changes(o, 0, AsOf::Latest).await.expect("changes").len(), 2, "{o}");
    }
    evolve("bucket:32");
    for o in &objects {
        let changes = cold.read_changes(o, 0, AsOf::Latest).await.expect("changes");
        assert_eq!(changes.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2], "{o}: every file found");
        let l = cold.lookup(o, "k", AsOf::Latest).await.expect("lookup");
        assert_eq!(l.value.map(|v| v.value), Some(bytes::Bytes::from_static(b"v")), "{o}");
    }
}

/// Another engine moves `seq` after `token` (PyIceberg `move_after`) while a store is open:
/// the store's next append is refused (`InvalidInput` naming the columns) instead of writing
/// records by position, which put each record's token under `seq` and its seq under `token`;
/// the rows already written still read back as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_after_another_engine_reorders_columns_is_refused() {
    let Some(python) = common::python("an_append_after_another_engine_reorders_columns_is_refused") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["interop"], "moved")
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    let one = |seq: u64| ColdBatch::single(o.clone(), FencingToken::new(5), vec![rec(&o, seq, "k", Some(b"v"), 5)]);
    cold.append(one(1)).await.expect("append");
    let out = py_output(
        std::process::Command::new(&python)
            .arg(common::py_dir().join("move_column.py"))
            .arg(dir.path().join("catalog.db"))
            .arg(cold.warehouse())
            .arg("interop.moved"),
        "run move_column.py",
    );
    assert!(out.status.success(), "move_column.py: {}", String::from_utf8_lossy(&out.stderr));
    cold.refresh().await.expect("the store sees the new schema");
    let e = cold.append(one(2)).await.expect_err("refused");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("no longer) a dotdo change table"), "{e}");
    let changes = cold.read_changes(&o, 0, AsOf::Latest).await.expect("changes");
    assert_eq!(changes.iter().map(|c| (c.seq, c.token.get())).collect::<Vec<_>>(), [(1, 5)]);
    // A store opened after the change (a restarted node) reads the table as the open one does,
    // and refuses appends the same way; it refused to open.
    let reopened = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["interop"], "moved")
        .build()
        .await
        .expect("a store opens the reordered table");
    let changes = reopened.read_changes(&o, 0, AsOf::Latest).await.expect("changes");
    assert_eq!(changes.iter().map(|c| (c.seq, c.token.get())).collect::<Vec<_>>(), [(1, 5)]);
    let e = reopened.append(one(2)).await.expect_err("refused");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
}

/// Another engine renames `seq` and `token` into each other (PyIceberg, through a spare name).
/// Iceberg resolves columns by field id, so the table's `seq` is now the old `token` data; dotdo
/// decodes by column name (it answered the old `seq` values as `seq`) and prunes by field id
/// (files could be skipped by the other column's bounds). Every read and write is refused with
/// `InvalidInput` naming the column instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_a_table_whose_columns_were_renamed_into_each_other_are_refused() {
    let Some(python) = common::python("reads_of_a_table_whose_columns_were_renamed_into_each_other_are_refused") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["interop"], "swapped")
        .build()
        .await
        .expect("open");
    let o = ObjectId::new("o").expect("id");
    let records: Vec<ChangeRecord> = (1..=10).map(|s| rec(&o, s, "n", Some(b"v"), 1)).collect();
    cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), records)).await.expect("append");
    assert_eq!(cold.read_changes(&o, 5, AsOf::Latest).await.expect("before").len(), 5);
    let out = py_output(
        std::process::Command::new(&python)
            .arg(common::py_dir().join("swap_columns.py"))
            .arg(dir.path().join("catalog.db"))
            .arg(cold.warehouse())
            .arg("interop.swapped"),
        "run swap_columns.py",
    );
    assert!(out.status.success(), "swap_columns.py: {}", String::from_utf8_lossy(&out.stderr));
    cold.refresh().await.expect("the store sees the new schema");
    let refused = |e: dotdo_core::Error, what: &str| {
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{what}: {e}");
        assert!(e.to_string().contains("renamed columns into each other"), "{what}: {e}");
        assert!(e.to_string().contains("\"seq\" is field 8 now but was field 7"), "{what}: {e}");
    };
    refused(cold.read_changes(&o, 5, AsOf::Latest).await.expect_err("read_changes"), "read_changes");
    refused(cold.load_state(&o, AsOf::Latest).await.expect_err("load_state"), "load_state");
    refused(cold.lookup(&o, "n", AsOf::Latest).await.expect_err("lookup"), "lookup");
    let e = cold
        .append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![rec(&o, 11, "n", Some(b"v"), 1)]))
        .await
        .expect_err("append");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
}

/// A format-version 1 table whose spec another engine evolved from bucket[16] to bucket[32]:
/// v1 keeps the removed field as `void(do_id)`, first in the new spec. A store opened after
/// the change prunes by the bucket[32] field and reads every object (it took the void field
/// and every read failed with `Backend`); appends under the two-field spec are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_table_with_a_voided_partition_field_reads_by_its_bucket_field() {
    let Some(python) = common::python("a_v1_table_with_a_voided_partition_field_reads_by_its_bucket_field") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let warehouse = url::Url::from_directory_path(dir.path()).expect("url").to_string();
    let run = |script: &str| {
        let out = py_output(
            std::process::Command::new(&python)
                .arg(common::py_dir().join(script))
                .arg(dir.path().join("catalog.db"))
                .arg(warehouse.trim_end_matches('/'))
                .arg("interop.v1"),
            &format!("run {script}"),
        );
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run("create_v1_table.py");
    let open = || async {
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .table(["interop"], "v1")
            .build()
            .await
            .expect("open")
    };
    let cold = open().await;
    let objects: Vec<ObjectId> = (0..20).map(|i| ObjectId::new(format!("obj-{i}")).expect("id")).collect();
    let batch = |seq: u64| common::one_value_each(&objects, seq, "v1");
    cold.append(batch(1)).await.expect("append to the v1 table");
    run("evolve_spec.py");
    let cold = open().await;
    for o in &objects {
        let st = cold.load_state(o, AsOf::Latest).await.expect("state");
        assert_eq!(st.entries.len(), 1, "{o}");
        let l = cold.lookup(o, "k", AsOf::Latest).await.expect("lookup");
        assert_eq!(l.value.map(|v| v.value), Some(bytes::Bytes::from_static(b"v1")), "{o}");
    }
    let e = cold.append(batch(2)).await.expect_err("two-field spec");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
}

/// A compaction during which another engine evolves the partition spec fails with `Conflict`
/// and commits nothing: its new files carry the old spec's partition values, which must never be
/// filed under the new spec (reads would prune rows away). Every record stays readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_racing_a_partition_spec_change_commits_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let Some(python) = common::python("a_compaction_racing_a_partition_spec_change_commits_nothing") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["interop"], "racing")
        .build()
        .await
        .expect("open");
    let objects: Vec<ObjectId> = (0..20).map(|i| ObjectId::new(format!("obj-{i}")).expect("id")).collect();
    for seq in 1..=3u64 {
        let batch = ColdBatch {
            objects: objects
                .iter()
                .map(|o| ObjectChanges {
                    object: o.clone(),
                    token: FencingToken::new(1),
                    records: vec![rec(o, seq, "k", Some(b"v"), 1)],
                })
                .collect(),
        };
        cold.append(batch).await.expect("append");
    }
    let evolved = Arc::new(AtomicBool::new(false));
    let (flag, db, warehouse) = (evolved.clone(), dir.path().join("catalog.db"), cold.warehouse().to_string());
    let progress: dotdo_iceberg::ProgressFn = Arc::new(move |p: &dotdo_iceberg::Progress| {
        if matches!(p, dotdo_iceberg::Progress::GroupWritten { .. }) && !flag.swap(true, Ordering::SeqCst) {
            let out = py_output(
                std::process::Command::new(&python)
                    .arg(common::py_dir().join("evolve_spec.py"))
                    .arg(&db)
                    .arg(&warehouse)
                    .arg("interop.racing"),
                "run evolve_spec.py",
            );
            assert!(out.status.success(), "evolve_spec.py: {}", String::from_utf8_lossy(&out.stderr));
        }
    });
    let options = dotdo_iceberg::CompactOptions { progress: Some(progress), ..Default::default() };
    let e = cold.compact(options).await.expect_err("the spec changed under the rewrite");
    assert!(evolved.load(Ordering::SeqCst), "the spec was evolved during the compaction");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    let fresh = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["interop"], "racing")
        .build()
        .await
        .expect("reopen");
    for o in &objects {
        let seqs: Vec<u64> =
            fresh.read_changes(o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3], "{o}");
    }
}

/// A local warehouse whose path needs URL escaping (a space, a `#`): PyIceberg, given the catalog
/// file and the warehouse URL, finds every file where dotdo wrote it and reads the same rows.
/// (The files go under the percent-encoded directory name, `my%20lake%20%231`, the catalog under
/// the plain one: see the note in `docs/iceberg-cold-store.md`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyiceberg_reads_a_table_in_a_warehouse_path_with_a_space() {
    let Some(python) = common::python("pyiceberg_reads_a_table_in_a_warehouse_path_with_a_space") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let warehouse = dir.path().join("my lake #1");
    let cold = IcebergColdStore::builder(warehouse.to_str().expect("utf-8"))
        .table(["interop"], "spaced")
        .build()
        .await
        .expect("open");
    let objects: Vec<ObjectId> = (0..3).map(|i| ObjectId::new(format!("acct:{i}")).expect("id")).collect();
    for (i, o) in objects.iter().enumerate() {
        let records = vec![rec(o, 1, "k", Some(format!("v{i}").as_bytes()), 1)];
        let changes = vec![ObjectChanges { object: o.clone(), token: FencingToken::new(1), records }];
        cold.append(ColdBatch { objects: changes }).await.expect("append");
    }
    let head = cold.refresh().await.expect("t").metadata().current_snapshot_id().expect("head");
    assert!(warehouse.join("catalog.db").exists(), "the catalog is in the warehouse directory");
    let out = py_output(
        std::process::Command::new(&python)
            .arg(common::py_dir().join("read_table.py"))
            .arg(warehouse.join("catalog.db"))
            .arg(cold.warehouse())
            .arg("interop.spaced")
            .arg(head.to_string()),
        "run read_table.py",
    );
    assert!(out.status.success(), "pyiceberg failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json from read_table.py");
    assert_eq!(rows_of(&v["latest"]), dotdo_rows(&cold, &objects, AsOf::Latest).await);
    assert_eq!(rows_of(&v["latest"]).len(), 3);
}
