//! Exactly-once delivery into a real Iceberg table under injected object-store faults, and
//! across SIGKILLs of a producer streaming in durable mode.
//! `DOTDO_FAULTS` (default 200) and `DOTDO_CRASH_KILLS` (default 20) raise the counts.

#![allow(clippy::disallowed_methods)] // tests pace processes with real sleeps

// The fault-injecting object store is shared with dotdo-iceberg's tests (not copied).
#[path = "../../dotdo-iceberg/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::FaultyStore;
use dotdo_core::*;
use dotdo_iceberg::IcebergColdStore;
use dotdo_pipelines::arrow::ArrowPipeline;
use dotdo_pipelines::*;
use object_store::ObjectStore;

const OBJECTS: usize = 4;

fn ev(key: String, n: u64, now: Timestamp) -> Event {
    Event::new(ObjectId::new(format!("obj-{}", n % OBJECTS as u64)).expect("valid"), "Event", key, n.to_string(), now)
}

/// The rows the table's commits added (no expiry or compaction runs here, so every commit is
/// still listed): a batch committed twice adds its rows twice, though reads, which keep one
/// record per sequence number, show them once.
async fn rows_added(cold: &IcebergColdStore) -> u64 {
    cold.snapshots().await.expect("snapshots").iter().map(|s| s.added_records).sum()
}

async fn delivered(cold: &IcebergColdStore) -> BTreeMap<String, usize> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for o in 0..OBJECTS {
        let recs =
            cold.read_changes(&ObjectId::new(format!("obj-{o}")).expect("valid"), 0, AsOf::Latest).await.expect("read");
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1, "gap-free sequence numbers");
            *seen.entry(r.key.clone()).or_default() += 1;
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_lost_or_duplicated_under_injected_store_faults() {
    let target = common::fault_target();
    let dir = tempfile::tempdir().expect("tempdir");
    let local: Arc<dyn ObjectStore> = Arc::new(object_store::local::LocalFileSystem::new());
    let faulty = Arc::new(FaultyStore::new(local, 0x5eed_b10b, 0.1));
    faulty.set_enabled(false);
    // Commits whose reply is lost after they landed (and commits refused) at the catalog too:
    // the object store's faults alone never lose the reply of a commit that landed.
    let uri = dotdo_iceberg::catalog::default_sqlite_uri(dir.path());
    let (catalog, lossy) = common::lossy_sql_catalog(uri, format!("file://{}", dir.path().display()), 11);
    let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
        .object_store(faulty.clone())
        .catalog(dotdo_iceberg::CatalogConfig::Custom(catalog))
        .table(["faults"], "events")
        .settings(dotdo_iceberg::Settings { max_commit_attempts: 2, ..Default::default() })
        .build()
        .await
        .expect("open");
    faulty.set_enabled(true);
    let settings = PipelineSettings { capacity: 10_000_000, ..Default::default() };
    let p = Pipeline::builder(Arc::new(cold.clone())).with_settings(settings).build().expect("pipeline");
    let clock = SystemClock::new();
    let (mut sent, mut failed_rolls, mut rolls, mut outages) = (0u64, 0u64, 0u64, 0u64);
    // The random faults injected (an outage's are counted apart: they do not count towards the
    // target).
    let forced = |outages: u64| outages * 40 - faulty.fail_puts_of.lock().as_ref().map_or(0, |(_, n)| u64::from(*n));
    while faulty.injected.load(Ordering::SeqCst) - forced(outages) < target {
        assert!(rolls < 20_000, "too many rolls without reaching {target} faults");
        let batch: Vec<Event> =
            (0..(1 + sent % 7)).map(|i| ev(format!("e{}", sent + i), sent + i, clock.now())).collect();
        sent += p.send(batch).expect("send") as u64;
        rolls += 1;
        if rolls % 25 == 0 {
            // An outage of metadata writes longer than a roll's retries (nine attempts, each
            // commit trying twice): the roll fails, its claimed batch stays, and a later roll
            // commits it.
            let left = faulty.fail_puts_of.lock().replace((".metadata.json".to_string(), 40));
            assert_eq!(left.map_or(0, |(_, n)| n), 0, "the last outage is over");
            outages += 1;
        }
        if p.roll().await.is_err() {
            failed_rolls += 1; // the claimed batch stays; the next roll commits it again
        }
    }
    faulty.set_enabled(false);
    // An outage the last roll began may still have failures left (`set_enabled` does not stop
    // it): counted, then ended, so that the final roll commits.
    let outage_faults = forced(outages);
    *faulty.fail_puts_of.lock() = None;
    p.close().await.expect("final roll");
    let seen = delivered(&cold).await;
    assert_eq!(seen.len() as u64, sent, "every event delivered");
    assert!(seen.values().all(|&n| n == 1), "an event was delivered twice");
    assert_eq!(rows_added(&cold).await, sent, "rows committed, a batch committed twice included");
    let m = p.metrics();
    println!(
        "pipeline faults: {} failures injected ({} lost replies) and {} in {outages} outages, {} delays, {sent} events, {rolls} rolls ({failed_rolls} failed), {} replayed at commit",
        faulty.injected.load(Ordering::SeqCst) - outage_faults,
        faulty.lost_replies.load(Ordering::SeqCst),
        outage_faults,
        faulty.delays.load(Ordering::SeqCst),
        m.events_replayed
    );
    let cat = lossy.lock().clone().expect("catalog built");
    let (lost, refused) = (cat.lost.load(Ordering::SeqCst), cat.failed.load(Ordering::SeqCst));
    println!("pipeline faults: catalog commits with a lost reply {lost}, refused {refused}");
    assert!(failed_rolls > 0, "no roll failed: the re-commit of a batch left claimed was not exercised");
    let put_faults = faulty.put_faults.lock().clone();
    println!("pipeline faults: failed file writes by kind (failures, lost replies): {put_faults:?}");
    // Writes of every file a commit makes failed, and some had their reply lost: not only reads.
    for kind in ["data", "manifest", "metadata"] {
        let (failed, lost) = put_faults.get(kind).copied().unwrap_or_default();
        assert!(failed >= 2 && lost >= 1, "too few faults on {kind} file writes: {failed} failed, {lost} lost");
    }
    assert!(faulty.lost_replies.load(Ordering::SeqCst) > 0, "no store reply was lost");
    assert!(lost > 0 && refused > 0, "catalog faults not injected: lost {lost}, refused {refused}");
    // A commit whose reply the catalog lost is found by the store's read-back (the catalog's
    // counters above say such commits happened; the exact-once check above says none doubled);
    // rolls failing and batches skipped as replays at the pipeline happen only when that
    // read-back fails too, so they are printed, not required.
}

const CHILD_ENV: &str = "DOTDO_PIPELINE_CHILD_DIR";

/// SIGKILLs of a crash test: `DOTDO_CRASH_KILLS`, at least (and by default) 20.
fn crash_kills() -> u32 {
    std::env::var("DOTDO_CRASH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(20).max(20)
}

/// This test binary again, running only the child test `test` of round `round` (on `dir`, named
/// by the environment variable `env`), its stdout piped.
fn spawn_round(test: &str, env: &str, dir: &Path, round: u32) -> dotdo_core::testkit::process::KillOnDrop {
    dotdo_core::testkit::process::KillOnDrop(
        Command::new(std::env::current_exe().expect("exe"))
            .args([test, "--exact", "--nocapture", "--test-threads=1", "--quiet"])
            .env(env, dir)
            .env("DOTDO_PIPELINE_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn"),
    )
}

/// SQLite's integrity check of the database at `db` passes (`what` says which, when). Read only:
/// a writable connection would recover and checkpoint the WAL a kill left, which the next child
/// must recover itself.
fn assert_intact(db: &Path, what: &str) {
    let check = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let integrity: String = check.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("integrity check");
    assert_eq!(integrity, "ok", "{what}");
}

async fn open_cold(dir: &Path) -> IcebergColdStore {
    let wh = dir.join("warehouse");
    std::fs::create_dir_all(&wh).expect("warehouse");
    IcebergColdStore::builder(wh.to_str().expect("utf-8")).table(["crash"], "events").build().await.expect("iceberg")
}

fn durable(dir: &Path) -> PipelineSettings {
    PipelineSettings {
        roll_interval: Duration::from_millis(30),
        durability: Durability::Durable(dir.join("log.db")),
        ..Default::default()
    }
}

/// Child side: streams events in durable mode, printing `ACK <key>` after each acknowledged send,
/// while the roll loop commits in the background. Does nothing unless spawned by the parent.
#[test]
fn pipeline_child_process() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else { return };
    let round = std::env::var("DOTDO_PIPELINE_ROUND").expect("round");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    rt.block_on(async {
        let dir = Path::new(&dir);
        let cold = open_cold(dir).await;
        let p = Pipeline::builder(Arc::new(cold)).with_settings(durable(dir)).build().expect("pipeline");
        let runner = p.clone();
        tokio::spawn(async move { runner.run().await });
        let clock = SystemClock::new();
        let (mut n, mut replayed) = (0u64, 0u64);
        loop {
            let batch: Vec<Event> =
                (0..(1 + n % 4)).map(|i| ev(format!("r{round}-e{}", n + i), n + i, clock.now())).collect();
            let keys: Vec<String> = batch.iter().map(|e| e.key.clone()).collect();
            n += batch.len() as u64;
            p.send(batch).expect("durable send");
            for k in keys {
                println!("ACK {k}");
            }
            // Claims an earlier child's commit landed for before its kill, found committed and
            // not committed again.
            let now_replayed = p.metrics().events_replayed;
            if now_replayed != replayed {
                replayed = now_replayed;
                println!("REPLAYED {replayed}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
}

#[test]
fn sigkilled_durable_producer_delivers_every_acknowledged_event_exactly_once() {
    let kills = crash_kills();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut acked: Vec<String> = Vec::new();
    let clock = SystemClock::new();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    // Rounds after which cold storage held more events than before: the children committed
    // (and were killed around their commits), not only logged.
    let (mut committed_before, mut rounds_that_committed) = (0usize, 0u32);
    // Rounds whose kill left acknowledged events in the durable log only (not yet in cold
    // storage): the next start had to deliver them from the log.
    let mut rounds_leaving_logged_events = 0u32;
    // Events of claims a child found already committed (its predecessor was killed between the
    // commit and the log's acknowledgement): the exactly-once path across a crash. The window is
    // short, so it is counted, not required (a test in pipeline.rs drives it deterministically).
    let mut replayed_by_children = 0u64;
    for round in 0..kills {
        let mut child = spawn_round("pipeline_child_process", CHILD_ENV, dir.path(), round);
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            let mut replayed = 0u64;
            for line in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
                if let Some(k) = line.strip_prefix("ACK ") {
                    let _ = tx.send(k.to_string());
                } else if let Some(n) = line.strip_prefix("REPLAYED ") {
                    replayed = n.parse().expect("a count");
                }
            }
            replayed
        });
        // Wait for the first acknowledgement, then kill at a random-ish moment.
        let first = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|e| panic!("round {round}: no ack: {e}"));
        // Events acknowledged by earlier children: this one replays those of them its
        // predecessors left in the durable log.
        let acked_earlier = acked.len();
        acked.push(first);
        let pause = 20 + (clock.now().as_micros() as u64 % 150);
        std::thread::sleep(Duration::from_millis(pause));
        if round % 2 == 0 {
            // Every other round is killed only once its child has committed something and has
            // delivered every event earlier children acknowledged (however slow the machine):
            // those rounds certainly kill a child that has been rolling, and show that a started
            // child replays what its predecessors left in the log.
            let waited = clock.monotonic();
            loop {
                let seen = rt.block_on(async { delivered(&open_cold(dir.path()).await).await });
                if seen.len() > committed_before && acked[..acked_earlier].iter().all(|k| seen.contains_key(k)) {
                    break;
                }
                assert!(
                    clock.monotonic() - waited < Duration::from_secs(60),
                    "round {round}: the child never committed, or never delivered what earlier children left in the log"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        dotdo_core::testkit::process::sigkill(&mut child, &format!("round {round}"));
        // The durable log the child was writing when killed is a healthy SQLite database.
        assert_intact(&dir.path().join("log.db"), &format!("round {round}: the durable log after the kill"));
        // So is the Iceberg SQL catalog it was committing to.
        // (The child opened its cold store, which creates the catalog, before its first ACK.)
        let catalog = dir.path().join("warehouse").join("catalog.db");
        assert!(catalog.exists(), "round {round}: no SQL catalog at {catalog:?}");
        assert_intact(&catalog, &format!("round {round}: the SQL catalog after the kill"));
        replayed_by_children += reader.join().expect("reader");
        acked.extend(rx.try_iter());
        let seen = rt.block_on(async { delivered(&open_cold(dir.path()).await).await });
        rounds_that_committed += u32::from(seen.len() > committed_before);
        rounds_leaving_logged_events += u32::from(acked.iter().any(|k| !seen.contains_key(k)));
        committed_before = seen.len();
    }
    println!(
        "pipeline kills: {kills}; {rounds_that_committed} rounds committed before their kill, \
         {rounds_leaving_logged_events} left acknowledged events in the log only"
    );
    // (Half of the rounds wait for a commit before their kill: `rounds_that_committed` is at
    // least half by construction, printed only.) The check: the log was really left holding
    // acknowledged events that the next start delivered (the final check below finds every one
    // of them in cold storage).
    assert!(
        rounds_leaving_logged_events > 0,
        "no kill left an acknowledged event outside cold storage: the log's replay was never needed"
    );
    // Restart once more: the durable log left by the last kill is replayed and rolled.
    rt.block_on(async {
        let cold = open_cold(dir.path()).await;
        let p = Pipeline::builder(Arc::new(cold.clone())).with_settings(durable(dir.path())).build().expect("reopen");
        let last = p.close().await.expect("final roll");
        replayed_by_children += last.replayed;
        let seen = delivered(&cold).await;
        let dup: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
        assert!(dup.is_empty(), "delivered twice: {dup:?}");
        assert_eq!(rows_added(&cold).await, seen.len() as u64, "rows committed, a batch committed twice included");
        let missing: Vec<_> = acked.iter().filter(|k| !seen.contains_key(*k)).collect();
        assert!(
            missing.is_empty(),
            "{} acknowledged events lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        println!(
            "pipeline crash: {kills} SIGKILLs ({rounds_that_committed} rounds committed before their kill), {} acknowledged events, {} delivered, none twice; {replayed_by_children} events of claims found committed after a kill (replayed, not committed again)",
            acked.len(),
            seen.len()
        );
    });
}

const ARROW_CHILD_ENV: &str = "DOTDO_ARROW_PIPELINE_CHILD_DIR";

/// The user table of the Arrow crash test: one `id` per row.
async fn arrow_table(dir: &Path) -> dotdo_iceberg::ArrowTable {
    let schema =
        Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new("id", arrow_schema::DataType::Int64, false)]));
    open_cold(dir).await.arrow_table(&["crash"], "rows", schema).await.expect("user table")
}

fn arrow_durable(dir: &Path) -> PipelineSettings {
    PipelineSettings { durability: Durability::Durable(dir.join("arrow-log.db")), ..durable(dir) }
}

/// Child side of the Arrow crash test: sends batches of 1 to 4 rows of increasing `id` (from
/// `DOTDO_PIPELINE_ROUND` * 1,000,000) to a durable `ArrowPipeline`, printing `ACK <id>` for each
/// row of an acknowledged send, while the roll loop commits in the background.
#[test]
fn arrow_pipeline_child_process() {
    let Some(dir) = std::env::var_os(ARROW_CHILD_ENV) else { return };
    let round: i64 = std::env::var("DOTDO_PIPELINE_ROUND").expect("round").parse().expect("a number");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    rt.block_on(async {
        let dir = Path::new(&dir);
        let table = arrow_table(dir).await;
        let schema = table.schema();
        let p = ArrowPipeline::open("s", Arc::new(table), arrow_durable(dir)).expect("pipeline");
        tokio::spawn(p.run());
        let mut next = round * 1_000_000;
        loop {
            let ids: Vec<i64> = (next..next + 1 + next % 4).collect();
            next += ids.len() as i64;
            let batch = arrow_array::RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(arrow_array::Int64Array::from(ids.clone()))],
            )
            .expect("batch");
            p.send(batch).expect("durable send");
            for id in ids {
                println!("ACK {id}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
}

/// A durable `ArrowPipeline` whose producer is killed with SIGKILL (`DOTDO_CRASH_KILLS`, at
/// least 20) at random moments, half of them once it has committed: every acknowledged row is
/// in the table exactly once after a last restart, the stream's batch mark never goes down, and
/// the log and catalog pass SQLite's integrity check after each kill (a clean drop, as the other
/// Arrow tests do, checkpoints the log's WAL: a kill leaves it to the next process).
#[test]
fn sigkilled_durable_arrow_producer_delivers_every_acknowledged_row_exactly_once() {
    use arrow_array::cast::AsArray;
    let kills = crash_kills();
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = SystemClock::new();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    let rows = |dir: &Path| {
        rt.block_on(async {
            let t = arrow_table(dir).await;
            let mut ids: BTreeMap<i64, usize> = BTreeMap::new();
            for b in t.read_all().await.expect("read") {
                let col = b.column_by_name("id").expect("id column");
                for id in col.as_primitive::<arrow_array::types::Int64Type>().values() {
                    *ids.entry(*id).or_default() += 1;
                }
            }
            (ids, t.last_batch("s").await.expect("mark"))
        })
    };
    let (mut acked, mut mark, mut rounds_leaving_logged_rows) = (Vec::new(), 0u64, 0u32);
    for round in 0..kills {
        let mut child = spawn_round("arrow_pipeline_child_process", ARROW_CHILD_ENV, dir.path(), round);
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
                if let Some(id) = line.strip_prefix("ACK ") {
                    let _ = tx.send(id.parse::<i64>().expect("an id"));
                }
            }
        });
        let first = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|e| panic!("round {round}: no ack: {e}"));
        acked.push(first);
        std::thread::sleep(Duration::from_millis(20 + (clock.now().as_micros() as u64 % 150)));
        if round % 2 == 0 {
            // Killed once this child has committed a batch of its own (so that kills also land
            // around commits and claims, not only among sends).
            let waited = clock.monotonic();
            while !rows(dir.path()).0.keys().any(|id| id / 1_000_000 == i64::from(round)) {
                assert!(
                    clock.monotonic() - waited < Duration::from_secs(60),
                    "round {round}: the child never committed"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        dotdo_core::testkit::process::sigkill(&mut child, &format!("round {round}"));
        reader.join().expect("reader");
        acked.extend(rx.try_iter());
        for db in [dir.path().join("arrow-log.db"), dir.path().join("warehouse").join("catalog.db")] {
            assert_intact(&db, &format!("round {round}: {} after the kill", db.display()));
        }
        let (seen, now) = rows(dir.path());
        assert!(now >= mark, "round {round}: the stream's mark went down from {mark} to {now}");
        mark = now;
        let twice: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
        assert!(twice.is_empty(), "round {round}: rows committed twice: {twice:?}");
        rounds_leaving_logged_rows += u32::from(acked.iter().any(|id| !seen.contains_key(id)));
    }
    assert!(rounds_leaving_logged_rows > 0, "no kill left an acknowledged row outside the table");
    // A last start: what the log holds is committed, once.
    rt.block_on(async {
        let p = ArrowPipeline::open("s", Arc::new(arrow_table(dir.path()).await), arrow_durable(dir.path()))
            .expect("reopen");
        p.close().await.expect("final roll");
    });
    let (seen, _) = rows(dir.path());
    let twice: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "rows committed twice: {twice:?}");
    let missing: Vec<_> = acked.iter().filter(|id| !seen.contains_key(id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged rows lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    println!(
        "arrow pipeline crash: {kills} SIGKILLs, {} acknowledged rows, {} in the table, none twice; \
         {rounds_leaving_logged_rows} kills left acknowledged rows in the log only",
        acked.len(),
        seen.len()
    );
}
