//! The roll loop rolls on its own by interval, into a real Iceberg table.

#![allow(clippy::disallowed_methods)] // the test paces itself with real sleeps

use std::sync::Arc;
use std::time::Duration;

use dotdo_core::*;
use dotdo_pipelines::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_rolls_by_interval_into_iceberg_and_reports_lag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = dotdo_iceberg::IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .table(["t"], "events")
        .build()
        .await
        .expect("iceberg");
    let settings = PipelineSettings { roll_interval: Duration::from_millis(200), ..Default::default() };
    let p = Pipeline::builder(Arc::new(cold.clone())).with_settings(settings).build().expect("pipeline");
    let runner = p.clone();
    let handle = tokio::spawn(async move { runner.run().await });
    let clock = SystemClock::new();
    for i in 0..30 {
        let e =
            Event::new(ObjectId::new(format!("o{}", i % 3)).expect("valid"), "T", format!("k{i}"), "v", clock.now());
        p.send(vec![e]).expect("send");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The loop rolls on its own: wait for it (nothing else rolls before `close` below), with a
    // generous limit for a loaded machine.
    let waited = clock.monotonic();
    while p.metrics().events_committed < 30 && clock.monotonic().saturating_sub(waited) < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = p.metrics();
    assert!(m.rolls >= 2, "the loop rolled by itself: {m:?}");
    assert_eq!(m.events_committed, 30, "{m:?}");
    assert!(m.last_lag >= Duration::from_millis(150) && m.last_lag < Duration::from_secs(5), "lag {:?}", m.last_lag);
    p.close().await.expect("close");
    handle.await.expect("run ends after close");
    let mut n = 0;
    for o in 0..3 {
        n += cold
            .read_changes(&ObjectId::new(format!("o{o}")).expect("valid"), 0, AsOf::Latest)
            .await
            .expect("read")
            .len();
    }
    assert_eq!(n, 30);
}
