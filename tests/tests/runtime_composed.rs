//! The object runtime over the real embedded backends: SQLite hot state + an Iceberg warehouse on
//! local files (SQL catalog). Fencing across two runtimes on one database, a long handler kept
//! alive by renewal, self-fencing, eviction with exact restore, and a runtime process killed with
//! SIGKILL and recovered on another.

#![allow(clippy::disallowed_methods)] // tests pace spawned tasks with real sleeps

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dotdo_core::runtime::{ObjectRuntime, RestoreMode, RuntimeSettings};
use dotdo_core::*;
use dotdo_iceberg::IcebergColdStore;
use dotdo_sqlite::SqliteStore;

struct Stores {
    hot: SqliteStore,
    cold: IcebergColdStore,
}

async fn open(dir: &Path, clock: Arc<dyn Clock>) -> Stores {
    let hot = SqliteStore::builder(dir.join("hot.db")).with_clock(clock.clone()).open().await.expect("open sqlite");
    let wh = dir.join("warehouse");
    std::fs::create_dir_all(&wh).expect("warehouse dir");
    let cold = IcebergColdStore::builder(wh.to_str().expect("utf-8"))
        .table(["app"], "changes")
        .with_clock(clock)
        .build()
        .await
        .expect("open iceberg");
    Stores { hot, cold }
}

fn runtime(s: &Stores, node: &str, clock: Arc<dyn Clock>, settings: RuntimeSettings) -> ObjectRuntime {
    ObjectRuntime::builder(NodeId::new(node).expect("valid"))
        .with_hot_store(Arc::new(s.hot.clone()))
        .with_guard(Arc::new(s.hot.clone()))
        .with_cold_sink(Arc::new(s.cold.clone()))
        .with_accelerator(Arc::new(s.cold.clone()))
        .with_clock(clock)
        .with_settings(settings)
        .build()
        .expect("runtime")
}

fn oid(s: &str) -> ObjectId {
    ObjectId::new(s).expect("valid")
}

async fn incr(rt: &ObjectRuntime, o: &ObjectId) -> Result<u64> {
    rt.invoke(o, async |t: &mut ObjectTxn<'_>| {
        let n: u64 = t.get("n").await?.map_or(0, |b| String::from_utf8_lossy(&b).parse().unwrap_or(0));
        t.put("n", (n + 1).to_string())?;
        Ok(n + 1)
    })
    .await
}

async fn read_n(rt: &ObjectRuntime, o: &ObjectId) -> u64 {
    rt.invoke(o, async |t: &mut ObjectTxn<'_>| t.get("n").await)
        .await
        .expect("read")
        .map_or(0, |b| String::from_utf8_lossy(&b).parse().expect("number"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runtimes_on_one_database_never_both_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(testkit::KIT_EPOCH);
    let c: Arc<dyn Clock> = Arc::new(clock.clone());
    let s = open(dir.path(), c.clone()).await;
    let settings = RuntimeSettings { lease_ttl: Duration::from_secs(6), ..Default::default() };
    let a = runtime(&s, "node-a", c.clone(), settings.clone());
    let b = runtime(&s, "node-b", c.clone(), settings);
    let o = oid("shared");
    assert_eq!(incr(&a, &o).await.expect("a"), 1);
    assert!(matches!(incr(&b, &o).await.expect_err("a holds").kind(), ErrorKind::LeaseHeld { .. }));
    clock.advance(Duration::from_secs(7)); // a stalls past its TTL
    assert_eq!(incr(&b, &o).await.expect("b takes over"), 2);
    let e = incr(&a, &o).await.expect_err("a must not write");
    assert!(matches!(e.kind(), ErrorKind::LeaseHeld { .. } | ErrorKind::Fenced { .. }), "{e}");
    // The stale token is rejected by SQLite itself, too.
    let stale = s.hot.put(&o, FencingToken::new(1), "T", "n", Bytes::from_static(b"999")).await.expect_err("stale");
    assert!(stale.is_fenced());
    assert_eq!(read_n(&b, &o).await, 2);
    b.flush(&o).await.expect("flush");
    assert_eq!(s.cold.watermark(&o).await.expect("wm").through, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_handler_renews_and_a_paused_one_self_fences() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(testkit::KIT_EPOCH);
    let c: Arc<dyn Clock> = Arc::new(clock.clone());
    let s = open(dir.path(), c.clone()).await;
    let ttl = Duration::from_secs(6);
    let rt = runtime(&s, "node-a", c.clone(), RuntimeSettings { lease_ttl: ttl, ..Default::default() });
    let o = oid("long");
    // Long handler: 3 TTLs in small steps; renewals keep the lease.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (rt2, o2) = (rt.clone(), o.clone());
    let task = tokio::spawn(async move {
        rt2.invoke(&o2, async move |t: &mut ObjectTxn<'_>| {
            t.put("n", "1")?;
            let _ = rx.await;
            Ok::<_, Error>(())
        })
        .await
    });
    for _ in 0..12 {
        testkit::advance_keeping_lease(&s.hot, &clock, &o, ttl / 4).await;
    }
    tx.send(()).expect("signal");
    task.await.expect("join").expect("renewed handler commits");
    assert_eq!(read_n(&rt, &o).await, 1);
    // Paused handler: the clock jumps past the TTL before a renewal can happen.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let (rt2, o2) = (rt.clone(), o.clone());
    let task = tokio::spawn(async move {
        rt2.invoke(&o2, async move |t: &mut ObjectTxn<'_>| {
            t.put("n", "stale")?;
            let _ = started_tx.send(());
            let _ = rx.await;
            Ok::<_, Error>(())
        })
        .await
    });
    started.await.expect("the handler runs");
    // Every jump lands past the lease's expiry: no renewal can succeed any more.
    let e = testkit::advance_until_finished(&clock, ttl * 2, task).await.expect("join").expect_err("self-fenced");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    drop(tx);
    let other = runtime(&s, "node-b", c, RuntimeSettings { lease_ttl: ttl, ..Default::default() });
    assert_eq!(read_n(&other, &o).await, 1, "nothing of the self-fenced handler was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_objects_restore_exactly_from_iceberg_in_every_mode() {
    for mode in
        [RestoreMode::Eager, RestoreMode::Lazy, RestoreMode::Hybrid { keys: vec![], prefixes: vec!["k/00".into()] }]
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let c: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let s = open(dir.path(), c.clone()).await;
        let settings = RuntimeSettings { restore: mode.clone(), ..Default::default() };
        let a = runtime(&s, "node-a", c.clone(), settings.clone());
        let o = oid("evictee");
        a.invoke(&o, async |t: &mut ObjectTxn<'_>| {
            for i in 0..200 {
                t.put(format!("k/{i:04}"), vec![i as u8; 100 + i])?;
            }
            Ok::<_, Error>(())
        })
        .await
        .expect("populate");
        a.invoke(&o, async |t: &mut ObjectTxn<'_>| {
            t.delete("k/0007")?;
            t.put("k/0008", "overwritten")
        })
        .await
        .expect("update");
        let before = a.invoke(&o, async |t: &mut ObjectTxn<'_>| t.list(KeyRange::all()).await).await.expect("list");
        a.evict(&o).await.expect("evict");
        a.shutdown().await.expect("shutdown");
        assert!(s.hot.list(&o, KeyRange::all(), None).await.expect("hot").is_empty());
        let b = runtime(&s, "node-b", c.clone(), settings);
        let first = b.invoke(&o, async |t: &mut ObjectTxn<'_>| t.get("k/0008").await).await.expect("first key");
        assert_eq!(first.as_deref(), Some(&b"overwritten"[..]), "{mode:?}");
        let gone = b.invoke(&o, async |t: &mut ObjectTxn<'_>| t.get("k/0007").await).await.expect("deleted");
        assert_eq!(gone, None);
        let after = b.invoke(&o, async |t: &mut ObjectTxn<'_>| t.list(KeyRange::all()).await).await.expect("list");
        assert_eq!(after, before, "{mode:?}: restored state differs");
        assert_eq!(incr(&b, &o).await.expect("write after restore"), 1);
        b.flush(&o).await.expect("flush");
        let seqs: Vec<u64> =
            s.cold.read_changes(&o, 0, AsOf::Latest).await.expect("changes").iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=203).collect::<Vec<_>>(), "{mode:?}: cold log has every change exactly once");
        // Reads keep one row per sequence number; the commits added each change once.
        let added: u64 = s.cold.snapshots().await.expect("snapshots").iter().map(|i| i.added_records).sum();
        assert_eq!(added, 203, "{mode:?}: records the commits added");
    }
}

// ---- a runtime process killed with SIGKILL, recovered on another ------------------------------

const CHILD_ENV: &str = "DOTDO_RUNTIME_CHILD_DIR";

/// Child side: a runtime that increments a counter forever, flushing every 25 calls, printing
/// `ACK n` after each acknowledged call. Does nothing unless spawned by the parent test.
#[test]
fn runtime_child_process() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    rt.block_on(async {
        let c: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let s = open(Path::new(&dir), c.clone()).await;
        let settings = RuntimeSettings {
            // (2 s: short, so that each round's survivor waits little, yet a commit's refresh
            // outlives a stall of the process on a loaded machine.)
            lease_ttl: Duration::from_secs(2),
            acquire_timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let node = format!("child-{}", std::process::id());
        let r = runtime(&s, &node, c, settings);
        let o = oid("crashy");
        let mut i = 0u64;
        loop {
            let n = incr(&r, &o).await.expect("increment");
            println!("ACK {n}");
            i += 1;
            if i.is_multiple_of(25) {
                println!("FLUSHING");
                r.flush(&o).await.expect("flush");
                println!("FLUSHED");
            }
        }
    });
}

#[test]
fn runtime_process_killed_with_sigkill_recovers_on_another_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("exe");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    // Each round waits out the dead runtime's lease, so the default run kills 3 times (the hot
    // stores' own crash tests kill 20 times); `DOTDO_SOAK=1 scripts/test` kills 20 times.
    let kills: u32 = std::env::var("DOTDO_RUNTIME_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let mut max_acked = 0u64;
    // Rounds whose dead runtime left acknowledged changes not yet in cold storage, which the
    // survivor then drained.
    let mut rounds_with_leftovers = 0u32;
    // Rounds killed inside a flush (after `FLUSHING`, before `FLUSHED`: during the Iceberg commit
    // or between it and the hot log's truncation). From the second round on, a round is killed 0
    // to 15 ms after its child starts a flush until one such kill landed (a flush that ends
    // before the kill arrives leaves it to the next round, up to ten rounds more).
    let mut killed_in_flush = 0u32;
    // Rounds past `kills` are run only while no kill landed inside a flush (at most ten more).
    let mut round = 0u32;
    while round < kills || (kills >= 2 && killed_in_flush == 0 && round < kills + 10) {
        let mut child = dotdo_core::testkit::process::KillOnDrop(
            Command::new(&exe)
                .args(["runtime_child_process", "--exact", "--nocapture", "--test-threads=1", "--quiet"])
                .env(CHILD_ENV, dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn child"),
        );
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // An acknowledged number, or `None` for a flush started (`FLUSHING`) and `Some(0)` for
        // one ended (`FLUSHED`).
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
                if let Some(n) = line.strip_prefix("ACK ") {
                    let _ = tx.send(Some(n.parse::<u64>().expect("number")));
                } else if line == "FLUSHING" {
                    let _ = tx.send(None);
                } else if line == "FLUSHED" {
                    let _ = tx.send(Some(0));
                }
            }
        });
        // Let it make progress past at least one flush, then kill it mid-stream. Each call adds
        // one to what the last one acknowledged (an increment acknowledged without landing would
        // be counted again by the next call: the same number twice).
        let target = max_acked + 30 + u64::from(round) * 7;
        let at_a_flush = round > 0 && killed_in_flush == 0;
        let mut next = max_acked + 1;
        let mut flushing = false;
        let mut seen = |line: Option<u64>, flushing: &mut bool| match line {
            None => *flushing = true,
            Some(0) => *flushing = false,
            Some(n) => {
                assert_eq!(n, next, "round {round}: acknowledged {n}, the call after {} acknowledged", next - 1);
                next += 1;
            }
        };
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    seen(line, &mut flushing);
                    if if at_a_flush { flushing } else { line.is_some_and(|n| n >= target) } {
                        break;
                    }
                }
                Err(e) => panic!("round {round}: child stopped acknowledging: {e}"),
            }
        }
        if at_a_flush {
            // Somewhere in the flush: its Iceberg commit, or between it and the truncation.
            std::thread::sleep(Duration::from_millis(u64::from(round % 4) * 5));
        }
        dotdo_core::testkit::process::sigkill(&mut child, &format!("round {round}"));
        reader.join().expect("reader");
        while let Ok(line) = rx.try_recv() {
            seen(line, &mut flushing);
        }
        killed_in_flush += u32::from(flushing);
        max_acked = next - 1;
        // Another node recovers: it waits out the dead holder's lease, sees every acknowledged
        // increment, and drains what the dead runtime had not flushed, exactly once.
        rt.block_on(async {
            let c: Arc<dyn Clock> = Arc::new(SystemClock::new());
            let s = open(dir.path(), c.clone()).await;
            let settings = RuntimeSettings {
                acquire_timeout: Duration::from_secs(5),
                keep_warm: Duration::ZERO,
                ..Default::default()
            };
            let o = oid("crashy");
            // The hot store itself holds every acknowledged increment (read before any runtime:
            // one would restore hot from cold if hot were behind, hiding a lost commit).
            let hot_n: u64 = s
                .hot
                .get(&o, "n")
                .await
                .expect("hot read")
                .map_or(0, |b| String::from_utf8_lossy(&b).parse().expect("number"));
            let last_seq = s.hot.object_info(&o).await.expect("hot info").map_or(0, |i| i.last_seq);
            assert!(
                hot_n >= max_acked && last_seq >= max_acked,
                "round {round}: hot holds {hot_n} (seq {last_seq}), acknowledged {max_acked}"
            );
            let other = runtime(&s, "survivor", c, settings);
            let n = read_n(&other, &o).await;
            assert_eq!(n, hot_n, "round {round}: the runtime reads what hot holds");
            assert!(n >= max_acked && n <= max_acked + 1, "round {round}: counter {n}, acknowledged {max_acked}");
            let drained_before = s.cold.watermark(&o).await.expect("watermark").through;
            rounds_with_leftovers += u32::from(drained_before < n);
            other.flush(&o).await.expect("drain leftovers");
            let cold = s.cold.load_state(&o, AsOf::Latest).await.expect("cold");
            assert_eq!(cold.through, n, "round {round}: cold has every change exactly once");
            let seqs: Vec<u64> =
                s.cold.read_changes(&o, 0, AsOf::Latest).await.expect("changes").iter().map(|r| r.seq).collect();
            assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "round {round}: duplicated or lost rows in cold");
            // Reads keep one record per sequence number: the rows the commits added also show a
            // batch committed twice (no expiry or compaction runs here).
            let added: u64 = s.cold.snapshots().await.expect("snapshots").iter().map(|i| i.added_records).sum();
            assert_eq!(added, n, "round {round}: rows committed to cold");
            s.hot.integrity_check().await.expect("sqlite integrity");
            max_acked = n;
        });
        round += 1;
    }
    let kills = round;
    println!(
        "runtime crash: {kills} SIGKILLs ({killed_in_flush} inside a flush), {max_acked} increments, all in hot \
         and exactly once in Iceberg; {rounds_with_leftovers} rounds left changes for the survivor to drain"
    );
    assert!(kills < 2 || killed_in_flush > 0, "no kill landed inside a flush in {kills} rounds");
    // The child flushes every 25 calls and is killed between: a round leaves nothing to drain
    // only if its kill lands right after a flush.
    assert!(rounds_with_leftovers > 0, "no kill left undrained changes: the survivor's drain was never tested");
}

/// The hot database rolled back behind cold storage (a restored backup; the same as losing the
/// last transactions to a power cut under synchronous=NORMAL): activation notices that cold has
/// newer changes and a higher token, restores from cold and takes a token above cold's, so new
/// writes are neither fenced nor skipped by cold as replays of sequence numbers it already has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_database_rolled_back_behind_cold_is_restored_from_cold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let o = oid("counter");
    roll_hot_back_behind_cold(dir.path(), &clock, &o).await;
    let s = open(dir.path(), clock.clone()).await;
    let rt = runtime(&s, "d", clock.clone(), RuntimeSettings::default());
    assert_eq!(read_n(&rt, &o).await, 5, "cold's newer state, not the backup's 2");
    assert_eq!(incr(&rt, &o).await.expect("incr after the rollback"), 6);
    rt.flush(&o).await.expect("flush: not fenced");
    let wm = s.cold.watermark(&o).await.expect("watermark");
    assert_eq!(wm.through, 6, "the new change reached cold");
    let st = s.cold.load_state(&o, AsOf::Latest).await.expect("cold state");
    assert_eq!(st.entries.iter().map(|e| &e.value[..]).collect::<Vec<_>>(), [&b"6"[..]]);
}

/// As above, but after the rollback something wrote to the hot store under a newer token (at a
/// sequence number cold already holds): hot and cold diverged, so activation stops with
/// `Corrupt` and drops nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_database_that_diverged_from_cold_is_refused_not_overwritten() {
    // Under a token above cold's, and under cold's own token (only the content differs).
    for token in [50, 3] {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let o = oid("counter");
        roll_hot_back_behind_cold(dir.path(), &clock, &o).await;
        let s = open(dir.path(), clock.clone()).await;
        let token = FencingToken::new(token);
        let r = s.hot.put(&o, token, "Counter", "n", Bytes::from_static(b"99")).await.expect("put");
        let rt = runtime(&s, "d", clock.clone(), RuntimeSettings::default());
        let e = incr(&rt, &o).await.expect_err("diverged");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{token}: {e}");
        let pending = s.hot.read_changes(&o, 0, 100).await.expect("changes");
        assert!(pending.iter().any(|c| c.seq == r.first_seq && c.token == token), "kept: {pending:?}");
    }
}

/// Leaves `dir` with a hot database rolled back behind cold: cold has `n` = 5 (through seq 5,
/// under the third lease), the hot database a backup taken at `n` = 2 under the first.
async fn roll_hot_back_behind_cold(dir: &Path, clock: &Arc<dyn Clock>, o: &ObjectId) {
    let files = |suffix: &str| {
        ["", "-wal", "-shm"].map(|ext| (dir.join(format!("hot.db{ext}")), dir.join(format!("{suffix}{ext}"))))
    };
    {
        let s = open(dir, clock.clone()).await;
        let rt = runtime(&s, "a", clock.clone(), RuntimeSettings::default());
        for _ in 0..2 {
            incr(&rt, o).await.expect("incr");
        }
        rt.flush(o).await.expect("flush");
        rt.shutdown().await.expect("shutdown");
    }
    for (live, backup) in files("backup.db") {
        if live.exists() {
            std::fs::copy(&live, &backup).expect("back up");
        }
    }
    // More history, under two more leases: cold ends at n = 5 with a higher token.
    for node in ["b", "c"] {
        let s = open(dir, clock.clone()).await;
        let rt = runtime(&s, node, clock.clone(), RuntimeSettings::default());
        if node == "c" {
            for _ in 0..3 {
                incr(&rt, o).await.expect("incr");
            }
        } else {
            assert_eq!(read_n(&rt, o).await, 2);
        }
        rt.flush(o).await.expect("flush");
        rt.shutdown().await.expect("shutdown");
    }
    for (live, backup) in files("backup.db") {
        let _ = std::fs::remove_file(&live);
        if backup.exists() {
            std::fs::copy(&backup, &live).expect("restore the old backup");
        }
    }
}
