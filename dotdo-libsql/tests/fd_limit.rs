//! A reader connection that cannot be opened because the process is out of file descriptors:
//! the read is a retryable `Unavailable` (it succeeds once descriptors free up), not the
//! non-retryable answer a bad path gets at `open`. Its own test binary: it uses up every file
//! descriptor of the process.

use dotdo_core::{ConsistencyGuard, ErrorKind, HotStore, HotStoreExt, NodeId, ObjectId};
use dotdo_libsql::LibsqlStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_cannot_be_opened_for_want_of_descriptors_is_retryable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = LibsqlStore::local(dir.path().join("hot.db")).open().await.expect("open");
    let o = ObjectId::new("o").expect("id");
    let l = s.acquire(&o, &NodeId::new("n").expect("id"), std::time::Duration::from_secs(60)).await.expect("acquire");
    s.put(&o, l.token, "T", "k", "v".into()).await.expect("put");
    // Every descriptor the process may open, taken (the limit here is tens of thousands).
    let mut held = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        held.push(f);
        assert!(held.len() < 10_000_000, "no descriptor limit reached");
    }
    let reads = futures::future::join_all((0..8).map(|_| s.get(&o, "k"))).await;
    let failed: Vec<_> = reads.iter().filter_map(|r| r.as_ref().err()).collect();
    drop(held);
    assert!(!failed.is_empty(), "no read needed a new connection");
    for e in failed {
        assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
        assert!(e.is_retryable(), "a moment's shortage of descriptors: {e}");
    }
    assert_eq!(s.get(&o, "k").await.expect("descriptors free again"), Some("v".into()));
}
