//! Accelerator reads and other writers: a read of a store that checks the catalog while it
//! reads the table state it knows must still answer from the current table.

use bytes::Bytes;
use dotdo_core::{AsOf, ChangeRecord, ColdBatch, ColdSink, FencingToken, IndexAccelerator, ObjectId, Op, Timestamp};
use dotdo_iceberg::IcebergColdStore;

fn put(o: &ObjectId, seq: u64, key: &str, value: &'static str) -> ChangeRecord {
    ChangeRecord {
        object: o.clone(),
        seq,
        key: key.into(),
        op: Op::Put,
        value: Bytes::from_static(value.as_bytes()),
        token: FencingToken::new(1),
        timestamp: Timestamp::from_millis(seq as i64),
        type_name: "T".into(),
    }
}

/// A store on the `acc.changes` table of the warehouse in `dir` (default settings).
async fn open_acc(dir: &std::path::Path) -> IcebergColdStore {
    IcebergColdStore::builder(dir.to_str().expect("utf-8 path")).table(["acc"], "changes").build().await.expect("open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_see_commits_of_another_store_on_the_same_catalog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || open_acc(dir.path());
    let (writer, reader) = (open().await, open().await);
    let o = ObjectId::new("obj-1").expect("id");
    let one = FencingToken::new(1);
    writer.append(ColdBatch::single(o.clone(), one, vec![put(&o, 1, "a", "1")])).await.expect("append");
    assert_eq!(&reader.lookup(&o, "a", AsOf::Latest).await.expect("lookup").value.expect("a").value[..], b"1");

    // The reader's known table is now stale.
    let c = writer
        .append(ColdBatch::single(o.clone(), one, vec![put(&o, 2, "a", "2"), put(&o, 3, "b", "3")]))
        .await
        .expect("append");
    let a = reader.lookup(&o, "a", AsOf::Latest).await.expect("lookup");
    assert_eq!(&a.value.expect("a").value[..], b"2", "a stale read was returned");
    assert_eq!(a.stats.snapshot, c.snapshot);

    writer.append(ColdBatch::single(o.clone(), one, vec![put(&o, 4, "c", "4")])).await.expect("append");
    let snap = writer.refresh().await.expect("refresh").metadata().current_snapshot_id().expect("snapshot");
    // A snapshot the reader does not know yet resolves against the current table.
    let c = reader.lookup(&o, "c", AsOf::Snapshot(snap)).await.expect("as-of a new snapshot");
    assert_eq!(&c.value.expect("c").value[..], b"4");
}

/// A file whose bounds span the object but whose every row group the statistics rule out
/// ("a" and "c" in separate row groups, a lookup of "b") counts as pruned by min/max, not as
/// opened: no row of it is decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_whose_row_groups_statistics_rule_out_is_not_counted_opened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .settings(dotdo_iceberg::Settings { buckets: 1, row_group_rows: 1, ..Default::default() })
        .build()
        .await
        .expect("open");
    let (a, c) = (ObjectId::new("a").expect("id"), ObjectId::new("c").expect("id"));
    let batch = ColdBatch {
        objects: vec![
            dotdo_core::ObjectChanges {
                object: a.clone(),
                token: FencingToken::new(1),
                records: vec![put(&a, 1, "k", "v")],
            },
            dotdo_core::ObjectChanges {
                object: c.clone(),
                token: FencingToken::new(1),
                records: vec![put(&c, 1, "k", "v")],
            },
        ],
    };
    cold.append(batch).await.expect("append");
    let b = ObjectId::new("b").expect("id");
    let l = cold.lookup(&b, "k", AsOf::Latest).await.expect("lookup");
    assert!(l.value.is_none());
    let st = &l.stats;
    assert_eq!((st.files_total, st.files_opened, st.row_groups_read), (1, 0, 0), "{st:?}");
    assert_eq!(st.pruned_by_min_max + st.pruned_by_bloom + st.pruned_by_partition, 1, "{st:?}");
}

/// A read of the table state the reader knew, discarded because the catalog answered with a newer
/// one, fetched its bytes all the same: `bytes_read` counts them. Another object's commit (in a
/// file the object's bounds rule out, so the current read fetches the same bytes) makes the
/// reader's state stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discarded_read_of_a_stale_table_counts_its_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || async {
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8 path"))
            .settings(dotdo_iceberg::Settings { buckets: 1, ..Default::default() })
            .build()
            .await
            .expect("open")
    };
    let (writer, reader) = (open().await, open().await);
    let (o, other) = (ObjectId::new("obj-1").expect("id"), ObjectId::new("zzz").expect("id"));
    let one = FencingToken::new(1);
    writer.append(ColdBatch::single(o.clone(), one, vec![put(&o, 1, "a", "1")])).await.expect("append");
    let bytes = || async { reader.lookup(&o, "a", AsOf::Latest).await.expect("lookup").stats.bytes_read };
    bytes().await; // footers cached from here on
    let warm = bytes().await;
    assert!(warm > 0, "a warm lookup reads the row group");

    writer.append(ColdBatch::single(other.clone(), one, vec![put(&other, 1, "a", "2")])).await.expect("append");
    let stale = bytes().await;
    assert_eq!(bytes().await, warm, "the other object's file is ruled out by its bounds");
    assert_eq!(stale, 2 * warm, "the discarded read's bytes count too");
}

/// A read of one object does not fetch manifests whose partition summary rules its bucket out
/// (a streaming table has one manifest per commit): on a fresh store, with every other
/// bucket's manifest damaged, the lookup, the state and the changes of the object still answer,
/// and the files of the skipped manifests count as pruned by partition. A read of an object in a
/// damaged manifest's bucket is `Corrupt` naming it (so the damage is real).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_skip_manifests_whose_partition_summary_rules_the_bucket_out() {
    use iceberg::spec::{Datum, Transform};
    let bucket = |o: &ObjectId| {
        let f = iceberg::transform::create_transform_function(&Transform::Bucket(16)).expect("bucket");
        f.transform_literal(&Datum::string(o.as_str())).expect("transform").expect("some")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || open_acc(dir.path());
    let writer = open().await;
    let one = FencingToken::new(1);
    let a = ObjectId::new("obj-a").expect("id");
    writer.append(ColdBatch::single(a.clone(), one, vec![put(&a, 1, "k", "v")])).await.expect("append a");
    let manifests = |d: &std::path::Path| {
        let mut v: Vec<_> = std::fs::read_dir(d.join("acc").join("changes").join("metadata"))
            .or_else(|_| std::fs::read_dir(d.join("acc.db").join("changes").join("metadata")))
            .expect("metadata dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.to_string_lossy().ends_with("-m0.avro"))
            .collect();
        v.sort();
        v
    };
    let of_a = manifests(dir.path());
    assert_eq!(of_a.len(), 1, "one commit, one manifest: {of_a:?}");
    // Ten more commits, each of one object in a bucket other than a's.
    let others: Vec<ObjectId> = (0..100)
        .map(|i| ObjectId::new(format!("obj-{i}")).expect("id"))
        .filter(|o| bucket(o) != bucket(&a))
        .take(10)
        .collect();
    for o in &others {
        writer.append(ColdBatch::single(o.clone(), one, vec![put(o, 1, "k", "w")])).await.expect("append other");
    }
    let damaged: Vec<_> = manifests(dir.path()).into_iter().filter(|p| !of_a.contains(p)).collect();
    assert_eq!(damaged.len(), 10);
    for p in &damaged {
        std::fs::write(p, b"not an avro file").expect("damage manifest");
    }
    let reader = open().await;
    let found = reader.lookup(&a, "k", AsOf::Latest).await.expect("lookup through skipped manifests");
    assert_eq!(&found.value.expect("k").value[..], b"v");
    let st = &found.stats;
    assert_eq!((st.files_total, st.pruned_by_partition, st.files_opened), (11, 10, 1), "{st:?}");
    let state = reader.load_state(&a, AsOf::Latest).await.expect("state through skipped manifests");
    assert_eq!(state.entries.len(), 1);
    assert_eq!(reader.read_changes(&a, 0, AsOf::Latest).await.expect("changes").len(), 1);
    let e = reader.lookup(&others[0], "k", AsOf::Latest).await.expect_err("its manifest is damaged");
    assert_eq!(*e.kind(), dotdo_core::ErrorKind::Corrupt, "{e}");
    assert!(damaged.iter().any(|p| e.to_string().contains(&*p.file_name().expect("name").to_string_lossy())), "{e}");
}
