//! The conformance kit through an Iceberg REST catalog: iceberg's REST client against a local
//! REST server (tests/py/rest_catalog.py, PyIceberg's SqlCatalog behind the REST protocol, which
//! checks each commit's requirements), with the warehouse in a temporary directory. Commits,
//! reads, a second sink on the same table, a reopened store, and commits whose reply the server
//! drops after applying them. Needs `DOTDO_PYTHON` (a Python with PyIceberg; `scripts/test` sets
//! it up); without it the tests print a SKIP line (and fail under `DOTDO_REQUIRE_PYTHON`).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use dotdo_core::testkit::{cold_factory, ColdFixture, LoseNextReply};
use dotdo_core::{AsOf, ColdBatch, ColdSink, FencingToken, ObjectId};
use dotdo_iceberg::{CatalogConfig, IcebergColdStore};

/// A store on `server`'s catalog for table `kit.<table>`.
async fn open(server: &common::RestCatalogServer, table: &str, clock: Arc<dyn dotdo_core::Clock>) -> IcebergColdStore {
    IcebergColdStore::builder(server.warehouse.path().to_str().expect("utf-8"))
        .catalog(CatalogConfig::Rest { uri: server.uri.clone(), warehouse: None, properties: Default::default() })
        .table(["kit"], table)
        .with_clock(clock)
        .build()
        .await
        .expect("open through the REST catalog")
}

/// The server shared by the kit's cases in this binary (none of them arms a lost reply), or
/// `None` without Python.
fn shared(test: &str) -> Option<&'static common::RestCatalogServer> {
    static SERVER: OnceLock<Option<common::RestCatalogServer>> = OnceLock::new();
    let python = common::python(test)?;
    SERVER.get_or_init(|| Some(common::RestCatalogServer::start(&python))).as_ref()
}

#[test]
fn a_rest_catalog_passes_the_cold_conformance_kit() {
    let Some(server) = shared("a_rest_catalog_passes_the_cold_conformance_kit") else { return };
    // Every commit goes through PyIceberg (about 5 s per property-test case here): 6 cases by
    // default rather than the kit's 24; a soak run (`DOTDO_SOAK=1 scripts/test`) sets its own.
    if std::env::var_os("DOTDO_PROPTEST_CASES").is_none() {
        std::env::set_var("DOTDO_PROPTEST_CASES", "6");
    }
    let tables = Arc::new(AtomicU64::new(0));
    let factory = cold_factory(move |clock| {
        let n = tables.fetch_add(1, Ordering::SeqCst);
        async move {
            let store = open(server, &format!("changes{n}"), Arc::new(clock)).await;
            ColdFixture { sink: Arc::new(store.clone()), accel: Some(Arc::new(store)), keep_alive: Box::new(()) }
        }
    });
    let failures = dotdo_core::testkit::cold::run_all(&factory);
    assert!(failures.is_empty(), "the REST catalog failed kit cases: {failures:#?}");
    let stats = server.control("GET", "/control/stats");
    println!("REST catalog at {}: every cold conformance case passed ({stats})", server.uri);
}

/// The kit's reopen cases: a directory the kit names is one table of the shared catalog (a
/// second store on it is a second node, or the same one restarted).
mod reopen {
    use super::*;

    fn factory() -> dotdo_core::testkit::ColdReopenFactory {
        // One map for every case of the binary (each case builds a factory of its own).
        static TABLES: OnceLock<parking_lot::Mutex<HashMap<std::path::PathBuf, usize>>> = OnceLock::new();
        dotdo_core::testkit::cold_reopen_factory(move |clock, dir| {
            let server = shared("rest_catalog::reopen").expect("python (DOTDO_PYTHON)");
            let n = {
                let mut t = TABLES.get_or_init(Default::default).lock();
                let next = t.len();
                *t.entry(dir).or_insert(next)
            };
            async move {
                let store = open(server, &format!("reopened{n}"), Arc::new(clock)).await;
                ColdFixture { sink: Arc::new(store.clone()), accel: Some(Arc::new(store)), keep_alive: Box::new(()) }
            }
        })
    }

    dotdo_core::cold_reopen_conformance!(factory());
}

/// The REST server's lost-reply switch: armed, its next commit is applied and its connection
/// closed without a reply.
struct DropReply(&'static common::RestCatalogServer, AtomicU64);

impl LoseNextReply for DropReply {
    fn arm(&self) {
        self.0.control("POST", "/control/lose-next-commit");
    }
    fn fired(&self) -> bool {
        let stats: serde_json::Value =
            serde_json::from_str(&self.0.control("GET", "/control/stats")).expect("stats json");
        let lost = stats["lost"].as_u64().expect("lost count");
        self.1.swap(lost, Ordering::SeqCst) < lost
    }
}

/// The kit's lost-reply cases through the REST catalog: a commit whose reply never came (the
/// server applied it) lands once, and keeps its token. The cases run one after another on a
/// server of their own (an armed loss would hit whichever commit comes next).
#[test]
fn a_rest_catalog_settles_commits_whose_reply_was_lost() {
    let Some(python) = common::python("a_rest_catalog_settles_commits_whose_reply_was_lost") else { return };
    let server: &'static common::RestCatalogServer = Box::leak(Box::new(common::RestCatalogServer::start(&python)));
    let tables = Arc::new(AtomicU64::new(0));
    let factory = dotdo_core::testkit::cold_fault_factory(move |clock| {
        let n = tables.fetch_add(1, Ordering::SeqCst);
        async move {
            let store = open(server, &format!("lossy{n}"), Arc::new(clock)).await;
            dotdo_core::testkit::ColdFaultFixture {
                fixture: ColdFixture {
                    sink: Arc::new(store.clone()),
                    accel: Some(Arc::new(store)),
                    keep_alive: Box::new(()),
                },
                lose_next_reply: Arc::new(DropReply(server, AtomicU64::new(0))),
            }
        }
    });
    let failures = dotdo_core::testkit::cold::run_fault_cases(&factory);
    assert!(failures.is_empty(), "the REST catalog failed lost-reply cases: {failures:#?}");
    let stats: serde_json::Value = serde_json::from_str(&server.control("GET", "/control/stats")).expect("stats json");
    assert!(stats["lost"].as_u64().expect("lost") >= 2, "every case lost a reply: {stats}");
}

/// Two stores on one table through the REST catalog, appending in turn from concurrent tasks:
/// every batch lands once (the server refuses a commit on a stale base; the loser reads the
/// watermarks again and commits on the new head).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_through_a_rest_catalog_lose_and_double_nothing() {
    let Some(server) = shared("two_writers_through_a_rest_catalog_lose_and_double_nothing") else { return };
    let clock: Arc<dyn dotdo_core::Clock> = Arc::new(dotdo_core::SystemClock::new());
    let (a, b) = (open(server, "contended", clock.clone()).await, open(server, "contended", clock).await);
    let writer = |store: IcebergColdStore, name: &'static str| {
        tokio::spawn(async move {
            let o = ObjectId::new(name).expect("id");
            for seq in 1..=15u64 {
                let r = common::put(&o, seq, &format!("k{seq}"), "v", 1);
                store.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![r])).await.expect("append");
            }
        })
    };
    let (ta, tb) = (writer(a.clone(), "a"), writer(b, "b"));
    ta.await.expect("writer a");
    tb.await.expect("writer b");
    for name in ["a", "b"] {
        let o = ObjectId::new(name).expect("id");
        let seqs: Vec<u64> =
            a.read_changes(&o, 0, AsOf::Latest).await.expect("changes").iter().map(|c| c.seq).collect();
        assert_eq!(seqs, (1..=15).collect::<Vec<_>>(), "{name}: every batch once");
    }
    let t = a.refresh().await.expect("table");
    assert_eq!(t.metadata().snapshots().count(), 30, "one snapshot per batch");
}
