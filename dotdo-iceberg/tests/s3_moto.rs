//! The conformance kit on an `s3://` warehouse served by a local S3-compatible server (moto,
//! started by this test on 127.0.0.1 with a free port), with the SQL catalog in a temporary
//! directory. Needs `DOTDO_PYTHON` (a Python with `moto[server]`; `scripts/test` sets it up);
//! without it the test prints a SKIP line.

mod common;

use std::sync::Arc;

use dotdo_core::testkit::{cold_factory, ColdFixture};
use dotdo_core::{AsOf, ColdBatch, ColdSink, FencingToken, ObjectId};
use dotdo_iceberg::{CatalogConfig, IcebergColdStore};

async fn open_s3(
    moto: &common::Moto,
    prefix: &str,
    clock: Arc<dyn dotdo_core::Clock>,
) -> (IcebergColdStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = dotdo_iceberg::catalog::default_sqlite_uri(dir.path());
    let store = IcebergColdStore::builder(format!("s3://{}/{prefix}", moto.bucket))
        .options(moto.options())
        .catalog(CatalogConfig::Sql { uri })
        .table(["kit"], "changes")
        .with_clock(clock)
        .build()
        .await
        .expect("open the s3 warehouse");
    (store, dir)
}

#[test]
fn s3_warehouse_on_local_moto_passes_the_cold_conformance_kit() {
    let Some(python) = common::python("s3_warehouse_on_local_moto_passes_the_cold_conformance_kit") else {
        return;
    };
    let moto = Arc::new(common::Moto::start(&python, "dotdo-kit"));
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let m = moto.clone();
    let factory = cold_factory(move |clock| {
        let m = m.clone();
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            let (store, dir) = open_s3(&m, &format!("wh{n}"), Arc::new(clock)).await;
            ColdFixture { sink: Arc::new(store.clone()), accel: Some(Arc::new(store)), keep_alive: Box::new(dir) }
        }
    });
    let failures = dotdo_core::testkit::cold::run_all(&factory);
    assert!(failures.is_empty(), "s3 (moto) backend failed kit cases: {failures:#?}");
    println!("s3 (moto at {}): every cold conformance case passed", moto.endpoint);
}

#[test]
fn s3_objects_land_in_the_bucket_and_reopen_from_the_catalog() {
    let Some(python) = common::python("s3_objects_land_in_the_bucket_and_reopen_from_the_catalog") else {
        return;
    };
    let moto = common::Moto::start(&python, "dotdo-reopen");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    rt.block_on(async {
        let clock: Arc<dyn dotdo_core::Clock> = Arc::new(dotdo_core::SystemClock::new());
        let (a, dir) = open_s3(&moto, "reopen", clock.clone()).await;
        let o = ObjectId::new("user:7").expect("id");
        let recs = (1..=3).map(|s| common::put(&o, s, &format!("k{s}"), "v", 1)).collect();
        a.append(ColdBatch::single(o.clone(), FencingToken::new(1), recs)).await.expect("append");
        // A second store on the same catalog file and bucket sees the commit.
        let uri = dotdo_iceberg::catalog::default_sqlite_uri(dir.path());
        let b = IcebergColdStore::builder(format!("s3://{}/reopen", moto.bucket))
            .options(moto.options())
            .catalog(CatalogConfig::Sql { uri })
            .table(["kit"], "changes")
            .build()
            .await
            .expect("reopen");
        assert_eq!(b.watermark(&o).await.expect("wm").through, 3);
        assert_eq!(b.load_state(&o, AsOf::Latest).await.expect("load").entries.len(), 3);
        assert!(b.table().metadata().location().starts_with("s3://dotdo-reopen/reopen/"));
    });
}
