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

/// The runtime a test drives its S3 calls on.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt")
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
    let failures = dotdo_core::testkit::cold::run_all_with_accelerator(&factory);
    assert!(failures.is_empty(), "s3 (moto) backend failed kit cases: {failures:#?}");
    println!("s3 (moto at {}): every cold conformance case passed", moto.endpoint);
}

#[test]
fn s3_objects_land_in_the_bucket_and_reopen_from_the_catalog() {
    let Some(python) = common::python("s3_objects_land_in_the_bucket_and_reopen_from_the_catalog") else {
        return;
    };
    let moto = common::Moto::start(&python, "dotdo-reopen");
    let rt = runtime();
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

/// A data file on S3 that is shorter than its manifest records (emptied, or cut short: a
/// partial upload another tool left) is `Corrupt` naming the file, as on local files. S3
/// answers the range read of an emptied object with 416, which was taken for a request the
/// store refuses (`Backend`).
#[test]
fn a_data_file_shorter_than_its_manifest_says_is_corrupt_on_s3() {
    let Some(python) = common::python("a_data_file_shorter_than_its_manifest_says_is_corrupt_on_s3") else {
        return;
    };
    let moto = common::Moto::start(&python, "dotdo-short");
    let rt = runtime();
    rt.block_on(async {
        for (n, keep) in [0usize, 10].into_iter().enumerate() {
            let (cold, _dir) = open_s3(&moto, &format!("short{n}"), Arc::new(dotdo_core::SystemClock::new())).await;
            let o = ObjectId::new("user:7").expect("id");
            let recs = (1..=3).map(|s| common::put(&o, s, &format!("k{s}"), "v", 1)).collect();
            cold.append(ColdBatch::single(o.clone(), FencingToken::new(1), recs)).await.expect("append");
            let t = cold.table();
            let snap = t.metadata().current_snapshot().expect("snapshot").clone();
            let list = t.manifest_list_reader(&snap).load().await.expect("list");
            let m = list.entries()[0].load_manifest(t.file_io()).await.expect("manifest");
            let path = m.entries()[0].data_file().file_path().to_string();
            let bytes = t.file_io().new_input(&path).expect("input").read().await.expect("read");
            let out = t.file_io().new_output(&path).expect("output");
            out.write(bytes.slice(..keep)).await.expect("cut the file short");
            let e = cold.load_state(&o, AsOf::Latest).await.expect_err("a damaged file");
            assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{keep} bytes kept: {e}");
            let name = path.rsplit('/').next().expect("name");
            assert!(e.to_string().contains(name), "{keep} bytes kept: {e}");
        }
    });
}

/// Files written through the table's FileIO go up whole on S3: a small one in one PUT, one of
/// exactly one part's size (10 MiB), and a larger one in parts (dotdo's multipart writer, parts
/// sent side by side), each read back byte for byte in order.
#[test]
fn files_of_any_size_go_up_whole_on_s3() {
    let Some(python) = common::python("files_of_any_size_go_up_whole_on_s3") else {
        return;
    };
    let moto = common::Moto::start(&python, "dotdo-parts");
    let rt = runtime();
    rt.block_on(async {
        let (cold, _dir) = open_s3(&moto, "parts", Arc::new(dotdo_core::SystemClock::new())).await;
        let t = cold.table();
        for (name, len) in [("small.bin", 1000usize), ("one-part.bin", 10 << 20), ("parts.bin", (25 << 20) + 123)] {
            let content: Vec<u8> = (0..len).map(|i| (i / 4096 % 251) as u8).collect();
            let path = format!("{}/data/{name}", t.metadata().location());
            let mut w = t.file_io().new_output(&path).expect("output").writer().await.expect("writer");
            for chunk in content.chunks(3 << 20) {
                w.write(bytes::Bytes::copy_from_slice(chunk)).await.expect("write");
            }
            w.close().await.expect("close");
            let back = t.file_io().new_input(&path).expect("input").read().await.expect("read back");
            assert_eq!(back.len(), len, "{name}");
            assert!(back[..] == content[..], "{name}: the bytes read back differ");
        }
    });
}

/// A warehouse in a bucket that does not exist is a configuration error (`InvalidInput`), not
/// "file … is missing" (`Corrupt`, which sends an operator looking for damage).
#[test]
fn a_missing_bucket_is_a_configuration_error() {
    let Some(python) = common::python("a_missing_bucket_is_a_configuration_error") else {
        return;
    };
    let moto = common::Moto::start(&python, "dotdo-exists");
    let rt = runtime();
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let uri = dotdo_iceberg::catalog::default_sqlite_uri(dir.path());
        let e = IcebergColdStore::builder("s3://no-such-bucket-here/wh")
            .options(moto.options())
            .catalog(CatalogConfig::Sql { uri })
            .table(["kit"], "changes")
            .build()
            .await
            .expect_err("no such bucket");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{e}");
    });
}

/// The kit's reopen cases on S3: a directory the kit names is a warehouse prefix in one moto
/// bucket, with its SQL catalog in that directory (a second store on it is a second node, or the
/// same one restarted).
#[test]
fn s3_warehouse_passes_the_reopen_cases() {
    let Some(python) = common::python("s3_warehouse_passes_the_reopen_cases") else { return };
    let moto = Arc::new(common::Moto::start(&python, "dotdo-reopen-kit"));
    let prefixes: Arc<parking_lot::Mutex<std::collections::HashMap<std::path::PathBuf, usize>>> = Arc::default();
    let m = moto.clone();
    let factory = dotdo_core::testkit::cold_reopen_factory(move |clock, dir| {
        let n = {
            let mut p = prefixes.lock();
            let next = p.len();
            *p.entry(dir.clone()).or_insert(next)
        };
        let m = m.clone();
        async move {
            let store = IcebergColdStore::builder(format!("s3://{}/wh{n}", m.bucket))
                .options(m.options())
                .catalog(CatalogConfig::Sql { uri: dotdo_iceberg::catalog::default_sqlite_uri(&dir) })
                .table(["kit"], "changes")
                .with_clock(Arc::new(clock))
                .build()
                .await
                .expect("open the s3 warehouse");
            ColdFixture { sink: Arc::new(store.clone()), accel: Some(Arc::new(store)), keep_alive: Box::new(()) }
        }
    });
    let failures = dotdo_core::testkit::cold::run_reopen_cases(&factory);
    assert!(failures.is_empty(), "s3 (moto) backend failed reopen cases: {failures:#?}");
}

/// The kit's lost-reply cases on S3, through a SQL catalog that drops an armed commit's reply
/// after applying it.
#[test]
fn s3_warehouse_settles_commits_whose_reply_was_lost() {
    let Some(python) = common::python("s3_warehouse_settles_commits_whose_reply_was_lost") else { return };
    let moto = Arc::new(common::Moto::start(&python, "dotdo-lossy-kit"));
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let m = moto.clone();
    let factory = dotdo_core::testkit::cold_fault_factory(move |clock| {
        let (m, n) = (m.clone(), counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        async move {
            let dir = tempfile::tempdir().expect("tempdir");
            common::switched_fault_fixture(dir, format!("s3://{}/wh{n}", m.bucket), m.options(), clock).await
        }
    });
    let failures = dotdo_core::testkit::cold::run_fault_cases(&factory);
    assert!(failures.is_empty(), "s3 (moto) backend failed lost-reply cases: {failures:#?}");
}
