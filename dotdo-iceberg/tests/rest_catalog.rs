//! The conformance kit through an Iceberg REST catalog: iceberg's REST client against a local
//! REST server (tests/py/rest_catalog.py, PyIceberg's SqlCatalog behind the REST protocol, which
//! checks each commit's requirements), with the warehouse in a temporary directory. Commits,
//! reads, a second sink on the same table, a reopened store, and commits whose reply the server
//! drops after applying them. Needs `DOTDO_PYTHON` (a Python with PyIceberg; `scripts/test` sets
//! it up); without it the tests print a SKIP line (and fail under `DOTDO_REQUIRE_PYTHON`).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dotdo_core::testkit::{cold_factory, ColdFixture, LoseNextReply};
use dotdo_core::{AsOf, ColdBatch, ColdSink, FencingToken, ObjectId};
use dotdo_iceberg::{CatalogConfig, IcebergColdStore};

/// A builder of a store on `server`'s catalog for table `kit.<table>`.
fn builder(server: &common::RestCatalogServer, table: &str) -> dotdo_iceberg::IcebergColdStoreBuilder {
    IcebergColdStore::builder(server.warehouse.path().to_str().expect("utf-8"))
        .catalog(CatalogConfig::Rest { uri: server.uri.clone(), warehouse: None, properties: Default::default() })
        .table(["kit"], table)
}

/// A store on `server`'s catalog for table `kit.<table>`.
async fn open(server: &common::RestCatalogServer, table: &str, clock: Arc<dyn dotdo_core::Clock>) -> IcebergColdStore {
    builder(server, table).with_clock(clock).build().await.expect("open through the REST catalog")
}

/// The server's statistics (see tests/py/rest_catalog.py).
fn stats(server: &common::RestCatalogServer) -> serde_json::Value {
    serde_json::from_str(&server.control("GET", "/control/stats")).expect("stats json")
}

/// Commits the server applied to tables whose name starts with `prefix`, and commits it refused
/// on a stale base.
fn table_counts(server: &common::RestCatalogServer, prefix: &str) -> (u64, u64) {
    let s = stats(server);
    let tables = s["by_table"].as_object().expect("by_table");
    tables
        .iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(_, t)| (t["commits"].as_u64().unwrap_or(0), t["refused"].as_u64().unwrap_or(0)))
        .fold((0, 0), |(c, r), (c2, r2)| (c + c2, r + r2))
}

#[test]
fn a_rest_catalog_passes_the_cold_conformance_kit() {
    let Some(python) = common::python("a_rest_catalog_passes_the_cold_conformance_kit") else { return };
    let server = Arc::new(common::RestCatalogServer::start(&python));
    let tables = Arc::new(AtomicU64::new(0));
    let s = server.clone();
    let factory = cold_factory(move |clock| {
        let (n, s) = (tables.fetch_add(1, Ordering::SeqCst), s.clone());
        async move {
            let store = open(&s, &format!("changes{n}"), Arc::new(clock)).await;
            ColdFixture { sink: Arc::new(store.clone()), accel: Some(Arc::new(store)), keep_alive: Box::new(()) }
        }
    });
    // Every commit goes through PyIceberg (about 5 s per property-test case here): 6 cases
    // unless `DOTDO_PROPTEST_CASES` says (a soak run sets it).
    let cases = std::env::var_os("DOTDO_PROPTEST_CASES").map_or(6, |_| dotdo_core::testkit::proptest_cases());
    let failures = dotdo_core::testkit::cold::run_all_with_accelerator_with(&factory, cases);
    assert!(failures.is_empty(), "the REST catalog failed kit cases: {failures:#?}");
    let (commits, _) = table_counts(&server, "kit.changes");
    assert!(commits >= 50, "only {commits} commits went through the REST catalog");
    println!("REST catalog: every cold conformance case passed; {commits} commits");
}

/// The kit's reopen cases: a directory the kit names is one table of the server (a second store
/// on it is a second node, or the same one restarted).
#[test]
fn a_rest_catalog_passes_the_reopen_cases() {
    let Some(python) = common::python("a_rest_catalog_passes_the_reopen_cases") else { return };
    let server = Arc::new(common::RestCatalogServer::start(&python));
    let tables: Arc<parking_lot::Mutex<HashMap<std::path::PathBuf, usize>>> = Arc::default();
    let s = server.clone();
    let factory = dotdo_core::testkit::cold_reopen_factory(move |clock, dir| {
        let n = {
            let mut t = tables.lock();
            let next = t.len();
            *t.entry(dir).or_insert(next)
        };
        let s = s.clone();
        async move {
            let store = open(&s, &format!("reopened{n}"), Arc::new(clock)).await;
            ColdFixture { sink: Arc::new(store.clone()), accel: Some(Arc::new(store)), keep_alive: Box::new(()) }
        }
    });
    let failures = dotdo_core::testkit::cold::run_reopen_cases(&factory);
    assert!(failures.is_empty(), "the REST catalog failed reopen cases: {failures:#?}");
}

/// The REST server's lost-reply switch: armed, its next commit is applied and its connection
/// closed without a reply. Fired when the server's count of lost replies went up by one since
/// it was armed.
struct DropReply {
    server: Arc<common::RestCatalogServer>,
    armed_at: parking_lot::Mutex<Option<u64>>,
    arms: Arc<AtomicU64>,
    failure_armed_at: parking_lot::Mutex<Option<u64>>,
    failure_arms: Arc<AtomicU64>,
}

impl DropReply {
    fn lost(&self) -> u64 {
        stats(&self.server)["lost"].as_u64().expect("lost count")
    }
    fn failed(&self) -> u64 {
        stats(&self.server)["failed"].as_u64().expect("failed count")
    }
}

impl LoseNextReply for DropReply {
    fn arm(&self) {
        *self.armed_at.lock() = Some(self.lost());
        self.arms.fetch_add(1, Ordering::SeqCst);
        self.server.control("POST", "/control/lose-next-commit");
    }
    fn fired(&self) -> bool {
        match self.armed_at.lock().take() {
            Some(at) => self.lost() == at + 1,
            None => false,
        }
    }
    fn arm_failure(&self) -> bool {
        *self.failure_armed_at.lock() = Some(self.failed());
        self.failure_arms.fetch_add(1, Ordering::SeqCst);
        self.server.control("POST", "/control/fail-next-commit");
        true
    }
    fn failure_fired(&self) -> bool {
        match self.failure_armed_at.lock().take() {
            Some(at) => self.failed() == at + 1,
            None => false,
        }
    }
}

/// The kit's lost-reply cases through the REST catalog: a commit whose reply never came (the
/// server applied it) lands once, and keeps its token; one whose connection broke before the
/// server read it (nothing applied) is never reported landed. The cases run one after another
/// on a server of their own (an armed fault hits whichever commit comes next).
#[test]
fn a_rest_catalog_settles_commits_whose_reply_was_lost() {
    let Some(python) = common::python("a_rest_catalog_settles_commits_whose_reply_was_lost") else { return };
    let server = Arc::new(common::RestCatalogServer::start(&python));
    let (tables, arms) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failure_arms = Arc::new(AtomicU64::new(0));
    let (s, a, fa) = (server.clone(), arms.clone(), failure_arms.clone());
    let factory = dotdo_core::testkit::cold_fault_factory(move |clock| {
        let (n, s, a, fa) = (tables.fetch_add(1, Ordering::SeqCst), s.clone(), a.clone(), fa.clone());
        async move {
            let store = open(&s, &format!("lossy{n}"), Arc::new(clock)).await;
            dotdo_core::testkit::ColdFaultFixture {
                fixture: ColdFixture {
                    sink: Arc::new(store.clone()),
                    accel: Some(Arc::new(store)),
                    keep_alive: Box::new(()),
                },
                lose_next_reply: Arc::new(DropReply {
                    server: s,
                    armed_at: Default::default(),
                    arms: a,
                    failure_armed_at: Default::default(),
                    failure_arms: fa,
                }),
            }
        }
    });
    let failures = dotdo_core::testkit::cold::run_fault_cases(&factory);
    assert!(failures.is_empty(), "the REST catalog failed lost-reply cases: {failures:#?}");
    let (lost, arms) = (stats(&server)["lost"].as_u64().expect("lost"), arms.load(Ordering::SeqCst));
    assert!(arms >= 2, "each case armed a loss: {arms}");
    assert_eq!(lost, arms, "every armed loss happened");
    let (failed, failure_arms) =
        (stats(&server)["failed"].as_u64().expect("failed"), failure_arms.load(Ordering::SeqCst));
    assert_eq!((failed, failure_arms), (1, 1), "the failed-commit case ran (it was skipped), its failure happened");
}

/// Two stores on one table through the REST catalog, appending in turn: each append is made on
/// a known table the other store's commit left behind, so the server refuses it (a stale base)
/// and the store reads the watermarks again and commits on the new head. Every batch lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_through_a_rest_catalog_lose_and_double_nothing() {
    let Some(python) = common::python("two_writers_through_a_rest_catalog_lose_and_double_nothing") else {
        return;
    };
    let server = common::RestCatalogServer::start(&python);
    let clock: Arc<dyn dotdo_core::Clock> = Arc::new(dotdo_core::SystemClock::new());
    let (a, b) = (open(&server, "contended", clock.clone()).await, open(&server, "contended", clock).await);
    for seq in 1..=10u64 {
        for (store, name) in [(&a, "a"), (&b, "b")] {
            let o = ObjectId::new(name).expect("id");
            let r = common::put(&o, seq, &format!("k{seq}"), "v", 1);
            store.append(ColdBatch::single(o.clone(), FencingToken::new(1), vec![r])).await.expect("append");
        }
    }
    for name in ["a", "b"] {
        let o = ObjectId::new(name).expect("id");
        let seqs: Vec<u64> =
            a.read_changes(&o, 0, AsOf::Latest).await.expect("changes").iter().map(|c| c.seq).collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>(), "{name}: every batch once");
    }
    let t = a.refresh().await.expect("table");
    assert_eq!(t.metadata().snapshots().count(), 20, "one snapshot per batch");
    let (commits, refused) = table_counts(&server, "kit.contended");
    assert!(refused >= 10, "appends on a stale base were refused by the server: {refused} of {commits}");
}

/// A store on `server`'s catalog for table `kit.<table>` with `settings`.
async fn open_with(
    server: &common::RestCatalogServer,
    table: &str,
    settings: dotdo_iceberg::Settings,
) -> IcebergColdStore {
    builder(server, table).settings(settings).build().await.expect("open through the REST catalog")
}

/// A REST catalog that accepts connections and never answers (a hung server: here stopped with
/// SIGSTOP) fails an append within the settings' bounds (each request at most
/// `catalog_timeout`), with a typed error, not a hang: iceberg-catalog-rest's own HTTP client
/// has no timeout, and the append (and every append queued behind it) waited for ever. Once the
/// server answers again, the same batch lands exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_catalog_that_never_answers_fails_an_append_in_bounded_time() {
    let Some(python) = common::python("a_rest_catalog_that_never_answers_fails_an_append_in_bounded_time") else {
        return;
    };
    let server = common::RestCatalogServer::start(&python);
    let settings = dotdo_iceberg::Settings {
        catalog_timeout: std::time::Duration::from_secs(1),
        max_commit_attempts: 2,
        ..Default::default()
    };
    // The table created and first written with the default bounds (the server's first requests
    // may be slow, importing its file layer), the hung append through a store with the short one.
    let o = ObjectId::new("o").expect("id");
    let first = ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 1, "k1", "v", 1)]);
    open_with(&server, "hung", dotdo_iceberg::Settings::default())
        .await
        .append(first)
        .await
        .expect("append while the server answers");
    let store = open_with(&server, "hung", settings).await;
    let second = ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 2, "k2", "v", 1)]);
    server.signal("STOP");
    let hung = tokio::time::timeout(std::time::Duration::from_secs(90), store.append(second.clone())).await;
    server.signal("CONT");
    let e = hung.expect("the append ends while the catalog never answers").expect_err("no answer");
    assert!(
        matches!(e.kind(), dotdo_core::ErrorKind::Unavailable | dotdo_core::ErrorKind::AmbiguousOutcome),
        "a catalog that does not answer: {e}"
    );
    // (A store with the default bounds: the server may be slow to work through its backlog.)
    let store = open_with(&server, "hung", dotdo_iceberg::Settings::default()).await;
    store.append(second).await.expect("the same batch again, the server answering");
    let seqs: Vec<u64> =
        store.read_changes(&o, 0, AsOf::Latest).await.expect("changes").iter().map(|c| c.seq).collect();
    assert_eq!(seqs, [1, 2], "each change once");
}

/// A REST catalog that refuses connections (the server gone) fails an append's commit as
/// certainly not landed: a retryable `Unavailable`, not an `AmbiguousOutcome` (a commit whose
/// connection was refused was never sent; reading it back failed too, with the catalog down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_to_a_rest_catalog_that_refuses_connections_did_not_land() {
    let Some(python) = common::python("a_commit_to_a_rest_catalog_that_refuses_connections_did_not_land") else {
        return;
    };
    let mut server = common::RestCatalogServer::start(&python);
    let settings = dotdo_iceberg::Settings {
        max_commit_attempts: 2,
        refresh_reads: false,
        retry_base_delay: std::time::Duration::from_millis(1),
        ..Default::default()
    };
    let store = open_with(&server, "gone", settings).await;
    let o = ObjectId::new("o").expect("id");
    let first = ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 1, "k1", "v", 1)]);
    store.append(first).await.expect("append while the server runs");
    server.stop();
    let second = ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, 2, "k2", "v", 1)]);
    let e = store.append(second).await.expect_err("the catalog is gone");
    assert_eq!((e.kind(), e.is_retryable()), (&dotdo_core::ErrorKind::Unavailable, true), "{e}");
}

/// A REST catalog (or a proxy in front of it) answering a commit with a status that says it was
/// not applied: a 403 fails the append at once (one request, `Backend`, not retryable: it was
/// sent again on every attempt and ended `AmbiguousOutcome`) and leaves no data file; a 429 is
/// sent again while the append's attempts last (three in a row here) and lands once; a 302 is not followed (reqwest turned the POST into a GET, whose
/// answer, the table unchanged, was taken as the commit's) and fails as `InvalidInput`, for the
/// change table and a user table alike. Each batch lands once afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_a_rest_catalog_refuses_by_status_did_not_land() {
    use arrow_array::{Int32Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    let Some(python) = common::python("commits_a_rest_catalog_refuses_by_status_did_not_land") else { return };
    let server = common::RestCatalogServer::start(&python);
    let settings =
        dotdo_iceberg::Settings { retry_base_delay: std::time::Duration::from_millis(1), ..Default::default() };
    let store = open_with(&server, "answered", settings).await;
    let o = ObjectId::new("o").expect("id");
    let batch = |seq: u64| ColdBatch::single(o.clone(), FencingToken::new(1), vec![common::put(&o, seq, "k", "v", 1)]);
    store.append(batch(1)).await.expect("append while the server answers 200");
    let answered = || stats(&server)["answered"].as_u64().expect("answered count");
    let parquet = || {
        common::files_ending_with(server.warehouse.path(), ".parquet")
            .into_iter()
            .filter(|f| f.to_string_lossy().contains("answered"))
            .count()
    };
    let (commits, _) = table_counts(&server, "kit.answered");
    assert_eq!((commits, parquet()), (1, 1));

    server.control("POST", "/control/answer-next-commit/403");
    let e = store.append(batch(2)).await.expect_err("forbidden");
    assert_eq!((e.kind(), e.is_retryable()), (&dotdo_core::ErrorKind::Backend, false), "{e}");
    assert_eq!(answered(), 1, "one request: a refusal is not sent again");
    assert_eq!(table_counts(&server, "kit.answered").0, 1);
    assert_eq!(parquet(), 1, "the refused commit's data files are deleted");

    // Throttled three times in a row (a throttling catalog: more than the two failed commits an
    // append accepts from a catalog failing them), then committed.
    server.control("POST", "/control/answer-next-commit/429/3");
    let c = store.append(batch(2)).await.expect("throttled three times, then committed");
    assert_eq!(c.records_written, 1);
    assert_eq!(answered(), 4);

    server.control("POST", "/control/answer-next-commit/302");
    let e = store.append(batch(3)).await.expect_err("a redirect is not a commit");
    assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{e}");
    assert_eq!(answered(), 5);
    assert_eq!(store.append(batch(3)).await.expect("once the server answers").records_written, 1);
    let seqs: Vec<u64> =
        store.read_changes(&o, 0, AsOf::Latest).await.expect("changes").iter().map(|c| c.seq).collect();
    assert_eq!(seqs, [1, 2, 3], "each change once");

    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false)]));
    let user = store.arrow_table(&["kit"], "answered_user", schema.clone()).await.expect("user table");
    let rows = RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from(vec![1, 2, 3]))]).expect("batch");
    server.control("POST", "/control/answer-next-commit/302");
    let e = user.append("s", 1, vec![rows.clone()]).await.expect_err("a redirect is not a commit");
    assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{e}");
    assert_eq!(answered(), 6);
    assert_eq!(user.append("s", 1, vec![rows]).await.expect("once the server answers").rows, 3);
    assert_eq!(user.read_all().await.expect("read").iter().map(RecordBatch::num_rows).sum::<usize>(), 3);
}
