//! The object runtime on libSQL hot state (a local libSQL file: the real engine) and Iceberg cold
//! storage (a local warehouse with iceberg's memory catalog) in one process: writes, a flush
//! exactly once into Iceberg, an eviction, and the object restored from cold storage.

use std::sync::Arc;

use dotdo_core::runtime::{ObjectRuntime, RuntimeSettings};
use dotdo_core::{AsOf, ColdSink, Error, IndexAccelerator, NodeId, ObjectId, ObjectTxn, Result};
use dotdo_iceberg::{CatalogConfig, IcebergColdStore};
use dotdo_libsql::LibsqlStore;

async fn incr(rt: &ObjectRuntime, o: &ObjectId) -> Result<u64> {
    rt.invoke(o, async |t: &mut ObjectTxn<'_>| {
        let n: u64 = t.get("n").await?.map_or(0, |b| String::from_utf8_lossy(&b).parse().unwrap_or(0));
        t.put("n", (n + 1).to_string())?;
        Ok::<_, Error>(n + 1)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libsql_runtime_drains_into_iceberg_and_restores_from_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hot = LibsqlStore::local(dir.path().join("hot.db")).open().await.expect("libSQL store");
    let warehouse = dir.path().join("warehouse");
    let cold = IcebergColdStore::builder(warehouse.to_str().expect("utf-8"))
        .catalog(CatalogConfig::Memory)
        .table(["app"], "changes")
        .build()
        .await
        .expect("Iceberg store");
    let rt = ObjectRuntime::builder(NodeId::new("node-a").expect("node"))
        .with_hot_store(Arc::new(hot.clone()))
        .with_guard(Arc::new(hot.clone()))
        .with_cold_sink(Arc::new(cold.clone()))
        .with_accelerator(Arc::new(cold.clone()))
        .with_settings(RuntimeSettings::default())
        .build()
        .expect("runtime");
    let o = ObjectId::new("counter:1").expect("id");
    for n in 1..=5 {
        assert_eq!(incr(&rt, &o).await.expect("incr"), n);
    }
    let report = rt.flush_all().await.expect("flush");
    assert_eq!(report.records, 5, "{report:?}");
    assert_eq!(cold.watermark(&o).await.expect("watermark").through, 5);
    let seqs: Vec<u64> = cold.read_changes(&o, 0, AsOf::Latest).await.expect("changes").iter().map(|c| c.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5], "each change once, in Parquet files of the warehouse");
    let lookup = cold.lookup(&o, "n", AsOf::Latest).await.expect("lookup");
    assert_eq!(lookup.value.map(|v| v.value), Some(bytes::Bytes::from("5")));
    // Tiered out of the libSQL file, then back from Iceberg on the next call.
    rt.evict(&o).await.expect("evict");
    assert_eq!(dotdo_core::HotStore::get(&hot, &o, "n").await.expect("hot read"), None, "evicted");
    assert_eq!(incr(&rt, &o).await.expect("restored from cold"), 6);
    rt.shutdown().await.expect("shutdown");
    assert_eq!(cold.watermark(&o).await.expect("watermark").through, 6);
    // Reads keep one row per sequence number; the commits added each change once.
    let added: u64 = cold.snapshots().await.expect("snapshots").iter().map(|i| i.added_records).sum();
    assert_eq!(added, 6, "records the commits added");
    // One commit from `flush_all`, one from `shutdown`'s flush: Parquet files in the warehouse.
    let files = parquet_files(&warehouse.join("app").join("changes").join("data"));
    assert!(files >= 2, "{files} Parquet data files");
}

/// The Parquet files under `dir`, at any depth (partition directories).
fn parquet_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .expect("the table's data directory")
        .map(|e| e.expect("entry").path())
        .map(
            |p| if p.is_dir() { parquet_files(&p) } else { usize::from(p.extension().is_some_and(|x| x == "parquet")) },
        )
        .sum()
}

/// Without its `sql` feature dotdo-iceberg has no SQL catalog: a local warehouse's default
/// catalog (SQL) is refused with `InvalidInput` naming the feature, not a link error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_catalog_is_refused_without_its_feature() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect_err("no SQL catalog");
    assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("`sql` feature"), "{e}");
}
