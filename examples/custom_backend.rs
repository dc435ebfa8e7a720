//! Writing a custom backend and proving it with the conformance kit.
//!
//! ```text
//! cargo run --example custom_backend
//! ```
//!
//! `Instrumented<H>` wraps any [`HotStore`] and counts calls and fenced rejections — the shape of
//! a real custom backend (metrics, tracing, a cache, a remote protocol) that must keep the
//! contract exactly. The example runs the hot conformance kit's single-store part (every case
//! of one handle plus the model-based property tests; the reopen cases and the process tests
//! need a factory that reopens a database) against it and prints the verdict. In a backend crate you would
//! instead write `dotdo_core::hot_conformance!(factory());` in a test file.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use dotdo_core::testkit::{hot, hot_factory, HotFixture};
use dotdo_core::*;

/// Counts calls and fenced rejections of the wrapped store.
#[derive(Debug)]
struct Instrumented<H> {
    inner: H,
    writes: AtomicU64,
    reads: AtomicU64,
    fenced: AtomicU64,
}

impl<H> Instrumented<H> {
    fn new(inner: H) -> Self {
        Instrumented { inner, writes: AtomicU64::new(0), reads: AtomicU64::new(0), fenced: AtomicU64::new(0) }
    }

    fn count_fenced<T>(&self, r: Result<T>) -> Result<T> {
        if r.as_ref().is_err_and(|e| e.is_fenced()) {
            self.fenced.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

#[async_trait]
impl<H: HotStore> HotStore for Instrumented<H> {
    async fn write(&self, object: &ObjectId, token: FencingToken, batch: WriteBatch) -> Result<WriteReceipt> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.count_fenced(self.inner.write(object, token, batch).await)
    }
    async fn get(&self, object: &ObjectId, key: &str) -> Result<Option<Bytes>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.get(object, key).await
    }
    async fn list(&self, object: &ObjectId, range: KeyRange, limit: Option<usize>) -> Result<Vec<Entry>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.list(object, range, limit).await
    }
    async fn read_changes(&self, object: &ObjectId, after: Seq, limit: usize) -> Result<Vec<ChangeRecord>> {
        self.inner.read_changes(object, after, limit).await
    }
    async fn truncate_changes(&self, object: &ObjectId, token: FencingToken, through: Seq) -> Result<()> {
        self.count_fenced(self.inner.truncate_changes(object, token, through).await)
    }
    async fn object_info(&self, object: &ObjectId) -> Result<Option<ObjectInfo>> {
        self.inner.object_info(object).await
    }
    async fn objects_with_pending_changes(&self, after: Option<&ObjectId>, limit: usize) -> Result<Vec<ObjectId>> {
        self.inner.objects_with_pending_changes(after, limit).await
    }
    async fn evict(&self, object: &ObjectId, token: FencingToken) -> Result<()> {
        self.count_fenced(self.inner.evict(object, token).await)
    }
    async fn restore(&self, object: &ObjectId, token: FencingToken, entries: Vec<Entry>, through: Seq) -> Result<()> {
        self.count_fenced(self.inner.restore(object, token, entries, through).await)
    }
}

fn main() {
    let totals = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let t = totals.clone();
    let factory = hot_factory(move |clock| {
        let t = t.clone();
        async move {
            let backend = MemoryBackend::with_clock(Arc::new(clock));
            let store = Arc::new(Instrumented::new(backend.clone()));
            // Report the counters when the fixture is dropped at the end of each case.
            struct Report(Arc<Instrumented<MemoryBackend>>, Arc<(AtomicU64, AtomicU64)>);
            impl Drop for Report {
                fn drop(&mut self) {
                    self.1 .0.fetch_add(self.0.writes.load(Ordering::Relaxed), Ordering::Relaxed);
                    self.1 .1.fetch_add(self.0.fenced.load(Ordering::Relaxed), Ordering::Relaxed);
                }
            }
            HotFixture { hot: store.clone(), guard: Arc::new(backend), keep_alive: Box::new(Report(store, t)) }
        }
    });
    let failures = hot::run_all(&factory);
    let (writes, fenced) = (totals.0.load(Ordering::Relaxed), totals.1.load(Ordering::Relaxed));
    println!("conformance kit on Instrumented<MemoryBackend>: {} failing case(s)", failures.len());
    println!("the kit issued {writes} writes through the custom backend; {fenced} calls (writes, truncations, evictions, restores) were fenced as stale");
    for f in &failures {
        println!("  FAILED {}: {}", f.case, f.message);
    }
    if !failures.is_empty() {
        std::process::exit(1);
    }
}
