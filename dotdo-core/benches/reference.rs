//! Reference-backend benchmarks: the in-memory backends against a plain `BTreeMap` behind a
//! mutex (the floor any key/value store pays). Run through `scripts/bench`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dotdo_core::testkit::bench::{record, sample, us};
use dotdo_core::*;
use parking_lot::Mutex;

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let backend = MemoryBackend::new();
    let obj = ObjectId::new("bench").expect("valid");
    let lease = rt
        .block_on(backend.acquire(&obj, &NodeId::new("n").expect("valid"), Duration::from_secs(3600)))
        .expect("acquire");
    let value = Bytes::from(vec![7u8; 100]);
    let mut i = 0u64;
    let ours = sample(10_000, 100_000, 1, || {
        i += 1;
        let key = format!("k{}", i % 10_000);
        rt.block_on(backend.put(&obj, lease.token, "T", &key, value.clone())).expect("put");
        if i.is_multiple_of(1000) {
            // keep the change log bounded like a drainer would
            rt.block_on(backend.truncate_changes(&obj, lease.token, i)).expect("truncate");
        }
    });
    let map: Arc<Mutex<BTreeMap<String, Bytes>>> = Arc::default();
    let mut j = 0u64;
    let raw = sample(10_000, 100_000, 1, || {
        j += 1;
        map.lock().insert(format!("k{}", j % 10_000), value.clone());
    });
    record("memory/fenced_put_p50", "us", us(ours.p50()), "btreemap_insert", us(raw.p50()));
    record("memory/fenced_put_throughput", "ops/s", ours.ops_per_sec(), "btreemap_insert", raw.ops_per_sec());

    let get = sample(1000, 100_000, 1, || {
        rt.block_on(backend.get(&obj, "k5")).expect("get");
    });
    let raw_get = sample(1000, 100_000, 1, || {
        std::hint::black_box(map.lock().get("k5").cloned());
    });
    record("memory/get_p50", "us", us(get.p50()), "btreemap_get", us(raw_get.p50()));
}
