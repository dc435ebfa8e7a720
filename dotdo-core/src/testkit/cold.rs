//! Conformance cases for [`ColdSink`](crate::ColdSink) + [`IndexAccelerator`]
//! backends.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use proptest_state_machine::ReferenceStateMachine;

use super::{oid, proptest_cases, run_catching, runtime, CaseFailure, ColdFactory, ColdFixture, KIT_EPOCH};
use crate::accel::ScanQuery;
use crate::cold::{fold_changes, AsOf, ColdBatch, ObjectChanges, Watermark};
use crate::error::ErrorKind;
use crate::ids::{FencingToken, ObjectId, MAX_VALUE_BYTES};
use crate::record::{ChangeRecord, KeyRange, Op};
use crate::time::{Clock, ManualClock, Timestamp};
use crate::IndexAccelerator;

async fn open(f: &ColdFactory) -> (ColdFixture, ManualClock) {
    let clock = ManualClock::new(KIT_EPOCH);
    (f(clock.clone()).await, clock)
}

fn accel(fx: &ColdFixture) -> &dyn IndexAccelerator {
    fx.accel.as_deref().expect("this case needs the backend's IndexAccelerator")
}

/// Whether the backend has an accelerator; the accelerator cases pass without one (it is
/// optional), saying so.
fn has_accel(fx: &ColdFixture, case: &str) -> bool {
    if fx.accel.is_none() {
        println!("SKIP {case}: the backend has no IndexAccelerator");
    }
    fx.accel.is_some()
}

/// The factory hands the kit the backend's [`IndexAccelerator`]: run by
/// [`cold_conformance!`](crate::cold_conformance)`(factory, with_accelerator)` and
/// [`run_all_with_accelerator`]. Without it, a factory that forgot to set
/// [`ColdFixture::accel`](super::ColdFixture::accel) passed every accelerator case unrun (each
/// only printed a `SKIP` line), for a backend whose accelerator is the point.
pub async fn the_factory_gives_its_accelerator(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    assert!(
        fx.accel.is_some(),
        "the backend declares an IndexAccelerator (`with_accelerator`), but its factory's ColdFixture has \
         `accel: None`: every accelerator case would be skipped"
    );
}

/// A change record for tests: put when `value` is `Some`, delete otherwise.
pub fn rec(object: &ObjectId, seq: u64, key: &str, value: Option<&str>, token: u64) -> ChangeRecord {
    ChangeRecord {
        object: object.clone(),
        seq,
        key: key.to_string(),
        op: if value.is_some() { Op::Put } else { Op::Delete },
        value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())).unwrap_or_default(),
        token: FencingToken::new(token),
        timestamp: KIT_EPOCH.plus(std::time::Duration::from_millis(seq)),
        type_name: "T".to_string(),
    }
}

fn puts(object: &ObjectId, seqs: std::ops::RangeInclusive<u64>, token: u64) -> Vec<ChangeRecord> {
    seqs.map(|s| rec(object, s, &format!("k{s}"), Some(&format!("v{s}")), token)).collect()
}

fn tok(t: u64) -> FencingToken {
    FencingToken::new(t)
}

/// An append creates a snapshot, advances the watermark and is visible in `load_state`.
pub async fn append_then_load_state(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let o = oid("o1");
    let c = fx.sink.append(ColdBatch::single(o.clone(), tok(1), puts(&o, 1..=3, 1))).await.expect("append");
    assert!(c.snapshot.is_some());
    assert_eq!((c.records_written, c.records_skipped), (3, 0));
    assert_eq!(c.watermarks.get(&o).map(|w| w.through), Some(3));
    let wm = fx.sink.watermark(&o).await.expect("watermark");
    assert_eq!((wm.through, wm.token), (3, tok(1)));
    assert_eq!(fx.sink.head(&o).await.expect("head"), (c.snapshot, wm), "the newest snapshot and its watermark");
    assert_eq!(fx.sink.head(&oid("other")).await.expect("head"), (c.snapshot, Watermark::default()));
    let st = fx.sink.load_state(&o, AsOf::Latest).await.expect("load");
    assert_eq!(st.through, 3);
    assert_eq!(st.snapshot, c.snapshot);
    assert_eq!(
        st.entries.iter().map(|e| (e.key.as_str(), e.seq)).collect::<Vec<_>>(),
        [("k1", 1), ("k2", 2), ("k3", 3)]
    );
    assert_eq!(st.entries[0].value, Bytes::from_static(b"v1"));
    let snaps = fx.sink.snapshots().await.expect("snapshots");
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].added_records, 3);
    assert_eq!(Some(snaps[0].id), c.snapshot);
    assert_eq!(fx.sink.watermark(&oid("other")).await.expect("wm").through, 0);
}

/// Re-appending a committed batch (a retry or crash replay) writes nothing and creates no
/// snapshot.
pub async fn replayed_batch_is_skipped(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let o = oid("o1");
    let batch = ColdBatch::single(o.clone(), tok(1), puts(&o, 1..=4, 1));
    fx.sink.append(batch.clone()).await.expect("append");
    let again = fx.sink.append(batch).await.expect("replay");
    assert_eq!(again.snapshot, None);
    assert_eq!((again.records_written, again.records_skipped), (0, 4));
    assert_eq!(fx.sink.snapshots().await.expect("snaps").len(), 1);
    assert_eq!(fx.sink.read_changes(&o, 0, AsOf::Latest).await.expect("changes").len(), 4);
}

/// What a cold backend acknowledged survives a reopen (a restart after a crash: the old handle
/// is never dropped, see [`crash`](super::crash)): watermarks (replays are still skipped, a
/// lower committer token still fenced), state and snapshots.
pub async fn watermarks_and_state_survive_reopen(f: &super::ColdReopenFactory) {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(KIT_EPOCH);
    let fx = f(clock.clone(), dir.path().to_path_buf()).await;
    let o = oid("o1");
    let batch = ColdBatch::single(o.clone(), tok(5), puts(&o, 1..=3, 5));
    let c = fx.sink.append(batch.clone()).await.expect("append");
    let snap = c.snapshot.expect("snapshot");
    super::crash(fx);
    let fx = f(clock.clone(), dir.path().to_path_buf()).await;
    let wm = fx.sink.watermark(&o).await.expect("wm");
    assert_eq!((wm.through, wm.token), (3, tok(5)));
    let again = fx.sink.append(batch).await.expect("replay");
    assert_eq!((again.records_written, again.records_skipped, again.snapshot), (0, 3, None));
    let stale = ColdBatch::single(o.clone(), tok(4), puts(&o, 4..=4, 4));
    assert!(fx.sink.append(stale).await.expect_err("lower token").is_fenced());
    assert_eq!(fx.sink.load_state(&o, AsOf::Snapshot(snap)).await.expect("state").through, 3);
    assert_eq!(fx.sink.snapshots().await.expect("snaps").iter().map(|s| s.id).collect::<Vec<_>>(), [snap]);
    // The data itself, not only the watermark, came back.
    let st = fx.sink.load_state(&o, AsOf::Latest).await.expect("latest");
    let want: Vec<(String, Bytes, u64)> = (1..=3).map(|s| (format!("k{s}"), Bytes::from(format!("v{s}")), s)).collect();
    assert_eq!(strip(&st.entries), want);
    assert_eq!(fx.sink.read_changes(&o, 0, AsOf::Latest).await.expect("changes"), puts(&o, 1..=3, 5));
    if let Some(accel) = &fx.accel {
        let l = accel.lookup(&o, "k2", AsOf::Latest).await.expect("lookup");
        assert_eq!(l.value.map(|v| v.seq), Some(2));
    }
}

/// `append`, sent again after an error a retry may mend (every append is safe to send again):
/// at most 20 attempts.
async fn append_retrying(sink: &dyn crate::ColdSink, batch: &ColdBatch) -> crate::ColdCommit {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match sink.append(batch.clone()).await {
            Ok(c) => return c,
            Err(e) if attempt < 20 && (e.is_retryable() || e.kind() == &ErrorKind::AmbiguousOutcome) => {
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("append of {} record(s), attempt {attempt}: {e}", batch.record_count()),
        }
    }
}

/// A takeover while a stale committer's appends (three records each) are in flight, with other
/// objects' appends beside them so that commits race for the table: once a commit under the
/// newer token has returned, every append under the older token sent after it is refused
/// (`Fenced`), and along the object's records tokens never go down. (A sink that checks the
/// token, then on a conflict rebases and commits without checking it again, lands the stale
/// batch's records after the newer committer's.)
pub async fn a_takeover_fences_every_later_stale_append(f: &ColdFactory) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let (fx, _) = open(f).await;
    let o = oid("o");
    let next_of = |sink: Arc<dyn crate::ColdSink>, o: ObjectId| async move {
        super::retrying("watermark", || sink.watermark(&o)).await.through + 1
    };
    let (granted, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let stale = {
        let (sink, o, granted) = (fx.sink.clone(), o.clone(), granted.clone());
        tokio::spawn(async move {
            let (mut accepted_late, mut fenced_late, mut after_grant) = (0u32, 0u32, 0u32);
            while after_grant < 10 {
                let sent_after_grant = granted.load(Ordering::SeqCst);
                let next = next_of(sink.clone(), o.clone()).await;
                match sink.append(ColdBatch::single(o.clone(), tok(1), puts(&o, next..=next + 2, 1))).await {
                    Ok(_) if sent_after_grant => accepted_late += 1,
                    Ok(_) => {}
                    Err(e) if e.is_fenced() => fenced_late += u32::from(sent_after_grant),
                    // A replay or a gap (the newer committer landed meanwhile), or contention.
                    Err(e) => assert!(
                        e.is_retryable() || matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::AmbiguousOutcome),
                        "a stale append fails as Fenced, or for its sequence numbers, or retryably: {e}"
                    ),
                }
                after_grant += u32::from(sent_after_grant);
                tokio::task::yield_now().await;
            }
            (accepted_late, fenced_late)
        })
    };
    let others: Vec<_> = (0..3)
        .map(|t| {
            let (sink, o, stop) = (fx.sink.clone(), oid(&format!("other-{t}")), stop.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) && i < 50 {
                    i += 1;
                    append_retrying(&*sink, &ColdBatch::single(o.clone(), tok(1), puts(&o, i..=i, 1))).await;
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    // Bounded in time, not in turns (a backend's reads may be far cheaper than its commits).
    #[allow(clippy::disallowed_methods)]
    let started = std::time::Instant::now();
    while next_of(fx.sink.clone(), o.clone()).await <= 3 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "the stale committer landed nothing in 2 minutes"
        );
        tokio::task::yield_now().await;
    }
    // The newer committer's first commit: sent again until a record of its own lands (a record
    // the stale committer landed first is a replay, which records no token). One record, so
    // that a stale batch under way lands past it if the sink lets it; after 20 lost races, ten
    // (a slow sink's stale committer, never waiting, could win every race).
    for attempt in 1.. {
        let next = next_of(fx.sink.clone(), o.clone()).await;
        let last = if attempt <= 20 { next } else { next + 9 };
        match fx.sink.append(ColdBatch::single(o.clone(), tok(2), puts(&o, next..=last, 2))).await {
            Ok(c) if c.records_written > 0 => break,
            Ok(c) => assert!(attempt < 1000, "the newer committer's record never landed: {c:?}"),
            Err(e) if e.is_retryable() || matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::AmbiguousOutcome) => {
                assert!(attempt < 1000, "the newer committer's append, attempt {attempt}: {e}");
            }
            Err(e) => panic!("the newer committer's append: {e}"),
        }
        tokio::task::yield_now().await;
    }
    granted.store(true, Ordering::SeqCst);
    let (accepted, fenced) = stale.await.expect("stale committer");
    stop.store(true, Ordering::SeqCst);
    for t in others {
        t.await.expect("other object's appends");
    }
    assert_eq!(accepted, 0, "a stale append sent after the newer committer's commit returned was accepted");
    assert!(fenced > 0, "no stale append sent after the takeover was refused as Fenced");
    let records = super::retrying("read changes", || fx.sink.read_changes(&o, 0, AsOf::Latest)).await;
    assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=records.len() as u64).collect::<Vec<_>>());
    assert!(records.windows(2).all(|w| w[0].token <= w[1].token), "a stale record landed after the newer one");
    assert_eq!(super::retrying("watermark", || fx.sink.watermark(&o)).await.token, tok(2));
}

/// Two sinks open at once on one table (two nodes draining the same object, or a restarted
/// drainer racing its predecessor) write each record once: both append the same one-record
/// batches, concurrently, and the table ends up with every sequence number exactly once; then a
/// commit under a higher token through one sink fences the lower token through the other. (A
/// sink that trusts a watermark it read before committing, without a check the commit itself
/// makes, writes records twice; one that keeps the highest token per handle lets the stale
/// token in.)
pub async fn two_sinks_on_one_table_write_each_record_once(f: &super::ColdReopenFactory) {
    const N: u64 = 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(KIT_EPOCH);
    let a = f(clock.clone(), dir.path().to_path_buf()).await;
    let b = f(clock.clone(), dir.path().to_path_buf()).await;
    let o = oid("o1");
    let drain = |sink: std::sync::Arc<dyn crate::ColdSink>| {
        let o = o.clone();
        tokio::spawn(async move {
            let mut written = 0u64;
            for i in 1..=N {
                let c = append_retrying(&*sink, &ColdBatch::single(o.clone(), tok(1), puts(&o, i..=i, 1))).await;
                assert_eq!(c.records_written + c.records_skipped, 1, "seq {i}: {c:?}");
                let through = c.watermarks.get(&o).map_or(0, |w| w.through);
                assert!(through >= i, "seq {i} is durable, so the watermark is at least {i}: {c:?}");
                written += c.records_written;
            }
            written
        })
    };
    let (ta, tb) = (drain(a.sink.clone()), drain(b.sink.clone()));
    let (wa, wb) = (ta.await.expect("sink a"), tb.await.expect("sink b"));
    assert!(wa + wb <= N, "{wa} + {wb} records reported written, of {N}");
    // In lockstep on another object, so that every append of b comes after a's commit of the
    // same record, whatever the scheduling above did: b, having read that object's watermark
    // before, must find each record committed (skip it), never write it again.
    let o2 = oid("o2");
    append_retrying(&*b.sink, &ColdBatch::single(o2.clone(), tok(1), puts(&o2, 1..=1, 1))).await;
    for i in 2..=N {
        let batch = ColdBatch::single(o2.clone(), tok(1), puts(&o2, i..=i, 1));
        let ca = append_retrying(&*a.sink, &batch).await;
        assert_eq!((ca.records_written, ca.records_skipped), (1, 0), "seq {i} of o2 through a: {ca:?}");
        let cb = append_retrying(&*b.sink, &batch).await;
        assert_eq!((cb.records_written, cb.records_skipped), (0, 1), "seq {i} of o2 again through b: {cb:?}");
        // Through the other handle, `head` pairs the newest snapshot (a's commit) with the
        // watermark in it (a handle's cached snapshot list beside a fresh watermark does not).
        let (snap, wm) = b.sink.head(&o2).await.expect("head through b");
        assert_eq!((snap, wm.through), (ca.snapshot, i), "head of o2 through b after a's commit of seq {i}");
    }
    let seqs: Vec<u64> = b.sink.read_changes(&o2, 0, AsOf::Latest).await.expect("o2").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>(), "o2: each record exactly once");
    // Reads may keep one row per sequence number; the commits themselves added each record once.
    let snaps = a.sink.snapshots().await.expect("snapshots");
    assert_eq!(snaps.iter().map(|s| s.added_records).sum::<u64>(), 2 * N, "records added by all commits: {snaps:?}");
    for (name, fx) in [("a", &a), ("b", &b)] {
        let changes = fx.sink.read_changes(&o, 0, AsOf::Latest).await.expect("changes");
        let seqs: Vec<u64> = changes.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=N).collect::<Vec<_>>(), "through sink {name}: each record exactly once");
        assert_eq!(changes, puts(&o, 1..=N, 1), "through sink {name}");
        let wm = fx.sink.watermark(&o).await.expect("watermark");
        assert_eq!(wm, Watermark { through: N, token: tok(1) }, "through sink {name}");
        let st = fx.sink.load_state(&o, AsOf::Latest).await.expect("state");
        assert_eq!((st.through, st.entries.len()), (N, N as usize), "through sink {name}");
    }
    let c = a
        .sink
        .append(ColdBatch::single(o.clone(), tok(2), puts(&o, N + 1..=N + 1, 1)))
        .await
        .expect("a higher token through sink a");
    assert_eq!(c.records_written, 1);
    let e = b
        .sink
        .append(ColdBatch::single(o.clone(), tok(1), puts(&o, N + 2..=N + 2, 1)))
        .await
        .expect_err("the lower token through sink b");
    assert!(e.is_fenced(), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    assert_eq!(b.sink.watermark(&o).await.expect("watermark"), Watermark { through: N + 1, token: tok(2) });
    let c = b
        .sink
        .append(ColdBatch::single(o.clone(), tok(2), puts(&o, N + 2..=N + 2, 1)))
        .await
        .expect("the higher token through sink b");
    assert_eq!(c.records_written, 1);
    let seqs: Vec<u64> =
        a.sink.read_changes(&o, 0, AsOf::Latest).await.expect("changes").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=N + 2).collect::<Vec<_>>(), "through sink a");
}

/// Appends through one sink from several tasks at once each commit atomically and exactly once:
/// four objects appended to by a task each, and one more object by two tasks sending the same
/// one-record batches (a retried drain racing the first): every acknowledged record is read back
/// once, the watermarks are the last sequence numbers, and the snapshots form one chain, each
/// commit's parent the one before. (A sink that swaps its table pointer without checking what it
/// replaces, or a handle whose commits race its own cached state, loses a commit here while both
/// callers get `Ok`.)
pub async fn concurrent_appends_through_one_sink_each_land_once(f: &ColdFactory) {
    const N: u64 = 8;
    let (fx, _) = open(f).await;
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (sink, o) = (fx.sink.clone(), oid(&format!("own-{t}")));
        tasks.push(tokio::spawn(async move {
            let mut written = 0;
            for i in 1..=N {
                let c = append_retrying(&*sink, &ColdBatch::single(o.clone(), tok(1), puts(&o, i..=i, 1))).await;
                assert_eq!(c.watermarks.get(&o).map(|w| w.through), Some(i), "{o} seq {i}: {c:?}");
                written += c.records_written;
                tokio::task::yield_now().await;
            }
            written
        }));
    }
    let shared = oid("shared");
    for _ in 0..2 {
        let (sink, o) = (fx.sink.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            let mut written = 0;
            for i in 1..=N {
                let c = append_retrying(&*sink, &ColdBatch::single(o.clone(), tok(1), puts(&o, i..=i, 1))).await;
                assert_eq!(c.records_written + c.records_skipped, 1, "{o} seq {i}: {c:?}");
                assert!(c.watermarks.get(&o).is_some_and(|w| w.through >= i), "{o} seq {i} is durable: {c:?}");
                written += c.records_written;
                tokio::task::yield_now().await;
            }
            written
        }));
    }
    let mut written = 0;
    for t in tasks {
        written += t.await.expect("appending task");
    }
    // At most once each: a correct sink may answer `AmbiguousOutcome` for a commit that landed,
    // and the re-send then reports its record skipped (the reads below prove each is there once).
    assert!(written <= 5 * N, "{written} records reported written, of {}", 5 * N);
    for o in (0..4).map(|t| oid(&format!("own-{t}"))).chain([shared]) {
        let changes = fx.sink.read_changes(&o, 0, AsOf::Latest).await.expect("changes");
        assert_eq!(changes, puts(&o, 1..=N, 1), "{o}: every acknowledged record once");
        assert_eq!(fx.sink.watermark(&o).await.expect("watermark"), Watermark { through: N, token: tok(1) }, "{o}");
    }
    let snaps = fx.sink.snapshots().await.expect("snapshots");
    assert_eq!(snaps.iter().map(|s| s.added_records).sum::<u64>(), 5 * N, "{snaps:?}");
    assert_eq!(snaps.first().and_then(|s| s.parent), None, "the first snapshot has no parent");
    for w in snaps.windows(2) {
        assert_eq!(w[1].parent, Some(w[0].id), "one chain of snapshots: {snaps:?}");
    }
}

/// `watermarks` gives, in the order asked, what `watermark` gives for each object: committed,
/// never committed, asked twice.
pub async fn watermarks_match_watermark_one_by_one(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let (a, b, never) = (oid("a"), oid("b"), oid("never"));
    fx.sink.append(ColdBatch::single(a.clone(), tok(2), puts(&a, 1..=3, 2))).await.expect("append a");
    fx.sink.append(ColdBatch::single(b.clone(), tok(1), puts(&b, 1..=1, 1))).await.expect("append b");
    let asked = [b.clone(), never.clone(), a.clone(), b.clone()];
    let batched = fx.sink.watermarks(&asked).await.expect("watermarks");
    let mut one_by_one = Vec::new();
    for o in &asked {
        one_by_one.push(fx.sink.watermark(o).await.expect("watermark"));
    }
    assert_eq!(batched, one_by_one);
    assert_eq!((batched[2].through, batched[2].token), (3, tok(2)));
    assert_eq!(batched[1], Watermark::default());
    assert!(fx.sink.watermarks(&[]).await.expect("none asked").is_empty());
}

/// An append that commits nothing (a replay, here under a higher token) reports the durable
/// watermarks: the same as `watermark` after it.
pub async fn a_replay_reports_the_durable_watermark(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let o = oid("o1");
    fx.sink.append(ColdBatch::single(o.clone(), tok(1), puts(&o, 1..=3, 1))).await.expect("append");
    let replay = fx.sink.append(ColdBatch::single(o.clone(), tok(2), puts(&o, 1..=3, 1))).await.expect("replay");
    assert_eq!((replay.snapshot, replay.records_written, replay.records_skipped), (None, 0, 3));
    let durable = fx.sink.watermark(&o).await.expect("wm");
    assert_eq!(replay.watermarks.get(&o), Some(&durable), "the commit reports what is durable");
    // The replay's higher token was not recorded (nothing was committed): token 1 still appends.
    assert_eq!(durable, Watermark { through: 3, token: tok(1) });
    fx.sink.append(ColdBatch::single(o.clone(), tok(5), vec![])).await.expect("an empty batch");
    assert_eq!(fx.sink.watermark(&o).await.expect("wm").token, tok(1), "nor an empty batch's");
    let next = fx.sink.append(ColdBatch::single(o.clone(), tok(1), puts(&o, 4..=4, 1))).await;
    assert_eq!(next.expect("token 1 is not fenced").records_written, 1);
}

/// A batch overlapping what is committed writes only the new tail.
pub async fn overlapping_batch_writes_only_new_records(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let o = oid("o1");
    fx.sink.append(ColdBatch::single(o.clone(), tok(1), puts(&o, 1..=5, 1))).await.expect("append");
    let c = fx.sink.append(ColdBatch::single(o.clone(), tok(1), puts(&o, 3..=8, 1))).await.expect("overlap");
    assert_eq!((c.records_written, c.records_skipped), (3, 3));
    let snaps = fx.sink.snapshots().await.expect("snapshots");
    assert_eq!(snaps.last().map(|s| s.added_records), Some(3), "the snapshot added what was new: {snaps:?}");
    assert_eq!(
        c.watermarks.get(&o),
        Some(&Watermark { through: 8, token: tok(1) }),
        "what is durable, not what was sent"
    );
    let seqs: Vec<u64> =
        fx.sink.read_changes(&o, 0, AsOf::Latest).await.expect("changes").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
}

/// A batch that would leave a gap after the watermark is `InvalidInput` and commits nothing.
pub async fn gap_in_sequence_is_rejected(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let o = oid("o1");
    fx.sink.append(ColdBatch::single(o.clone(), tok(1), puts(&o, 1..=2, 1))).await.expect("append");
    let e = fx.sink.append(ColdBatch::single(o.clone(), tok(1), puts(&o, 4..=5, 1))).await.expect_err("gap");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let mut bad = puts(&o, 3..=5, 1);
    bad.remove(1);
    let e = fx.sink.append(ColdBatch::single(o.clone(), tok(1), bad)).await.expect_err("internal gap");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    assert_eq!(fx.sink.watermark(&o).await.expect("wm").through, 2);
    // An object cold has never seen must start at sequence number 1.
    let fresh = oid("o2");
    let e = fx.sink.append(ColdBatch::single(fresh.clone(), tok(1), puts(&fresh, 3..=5, 1))).await.expect_err("gap");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "a first commit starting at 3: {e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    assert_eq!(fx.sink.watermark(&fresh).await.expect("wm"), Watermark::default());
    assert_eq!(fx.sink.snapshots().await.expect("snaps").len(), 1);
    fx.sink.append(ColdBatch::single(fresh.clone(), tok(1), puts(&fresh, 1..=2, 1))).await.expect("from 1");
    // A batch refused under a higher token records nothing of it, its token included: the
    // committer of token 1 goes on.
    let e = fx.sink.append(ColdBatch::single(o.clone(), tok(9), puts(&o, 4..=5, 9))).await.expect_err("gap");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let mut bad = puts(&o, 3..=4, 9);
    bad[1].key = String::new();
    let e = fx.sink.append(ColdBatch::single(o.clone(), tok(9), bad)).await.expect_err("an invalid record");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    assert_eq!(fx.sink.watermark(&o).await.expect("wm"), Watermark { through: 2, token: tok(1) });
    fx.sink.append(ColdBatch::single(o.clone(), tok(1), puts(&o, 3..=3, 1))).await.expect("token 1 is not fenced");
}

/// A commit's records become visible together: a reader polling while two-object batches land
/// sees whole batches only, in an object's state and in the other object's changes at the
/// snapshot it read. (A sink that commits one object at a time, or makes records visible before
/// its snapshot, shows half a batch.)
pub async fn a_batch_is_atomic_to_concurrent_readers(f: &ColdFactory) {
    const ROUNDS: u64 = 8;
    let (fx, _) = open(f).await;
    let (a, b) = (oid("a"), oid("b"));
    let rounds = super::hot::Rounds::default();
    let writer = {
        let (sink, a, b, rounds) = (fx.sink.clone(), a.clone(), b.clone(), rounds.clone());
        tokio::spawn(async move {
            for i in 0..ROUNDS {
                let (from, to) = (2 * i + 1, 2 * i + 2);
                let batch = ColdBatch {
                    objects: vec![
                        ObjectChanges { object: a.clone(), token: tok(1), records: puts(&a, from..=to, 1) },
                        ObjectChanges { object: b.clone(), token: tok(1), records: puts(&b, from..=to, 1) },
                    ],
                };
                append_retrying(&*sink, &batch).await;
                if i % 3 == 1 {
                    // A reader round runs while there are batches left to commit.
                    rounds.wait_for_a_whole_round().await;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let (mut reads, mut midway, mut newest) = (0u32, 0u32, 0u64);
    loop {
        let finished = writer.is_finished();
        let st = super::retrying("load a", || fx.sink.load_state(&a, AsOf::Latest)).await;
        assert_eq!(st.through % 2, 0, "half a batch of a visible (read {reads}): through {}", st.through);
        assert_eq!(st.entries.len() as u64, st.through, "a's keys (read {reads})");
        assert!(st.through >= newest, "the latest state went back from {newest} to {} (read {reads})", st.through);
        newest = st.through;
        if let Some(snapshot) = st.snapshot {
            let of_b =
                super::retrying("b at a's snapshot", || fx.sink.read_changes(&b, 0, AsOf::Snapshot(snapshot))).await;
            let seqs: Vec<u64> = of_b.iter().map(|r| r.seq).collect();
            assert_eq!(seqs, (1..=st.through).collect::<Vec<_>>(), "b's half of the batches a shows (read {reads})");
            if st.through < 2 * ROUNDS {
                midway += 1;
            }
        }
        // The head's watermark is its snapshot's (one answer: a sink keeping watermarks apart
        // from the data showed one ahead of, or behind, the records).
        let (head, wm) = super::retrying("head of a", || fx.sink.head(&a)).await;
        if let Some(head) = head {
            let at = super::retrying("a at its head", || fx.sink.load_state(&a, AsOf::Snapshot(head))).await;
            assert_eq!(at.through, wm.through, "the head's watermark and its snapshot's state (read {reads})");
        }
        reads += 1;
        rounds.done();
        if finished {
            break;
        }
        tokio::task::yield_now().await;
    }
    writer.await.expect("writer");
    assert!(midway > 0, "no read ran while batches were landing ({reads} reads)");
    assert_eq!(fx.sink.load_state(&a, AsOf::Latest).await.expect("load").through, 2 * ROUNDS);
}

/// A committer token lower than one already committed for the object is `Fenced`.
pub async fn stale_committer_is_fenced(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let o = oid("o1");
    fx.sink.append(ColdBatch::single(o.clone(), tok(5), puts(&o, 1..=2, 5))).await.expect("append");
    let e = fx.sink.append(ColdBatch::single(o.clone(), tok(4), puts(&o, 3..=3, 4))).await.expect_err("stale");
    assert!(e.is_fenced(), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    // Also a batch of replays alone (records cold already has): the token is checked first.
    let e = fx.sink.append(ColdBatch::single(o.clone(), tok(4), puts(&o, 1..=2, 5))).await.expect_err("stale replay");
    assert!(e.is_fenced(), "a replay under a stale token: {e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    // A newer committer may commit records written under older tokens.
    fx.sink.append(ColdBatch::single(o.clone(), tok(7), puts(&o, 3..=3, 4))).await.expect("newer committer");
    assert_eq!(fx.sink.watermark(&o).await.expect("wm").token, tok(7));
    let e = fx.sink.append(ColdBatch::single(o.clone(), tok(6), vec![])).await.expect_err("stale, even empty");
    assert!(e.is_fenced());
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
}

/// Tokens are compared as numbers: 9 is below 10 (as text, "9" sorts above "10": a sink storing
/// tokens as strings let a stale committer through once tokens reached two digits).
pub async fn tokens_are_compared_as_numbers(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let o = oid("o1");
    fx.sink.append(ColdBatch::single(o.clone(), tok(10), puts(&o, 1..=1, 10))).await.expect("append");
    let e = fx.sink.append(ColdBatch::single(o.clone(), tok(9), puts(&o, 2..=2, 9))).await.expect_err("9 is stale");
    assert!(e.is_fenced(), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    assert_eq!(fx.sink.watermark(&o).await.expect("wm"), Watermark { through: 1, token: tok(10) });
    fx.sink.append(ColdBatch::single(o.clone(), tok(11), puts(&o, 2..=2, 11))).await.expect("11 is newer");
    assert_eq!(fx.sink.watermark(&o).await.expect("wm"), Watermark { through: 2, token: tok(11) });
    // Across the widths a sink might store a token in (32-bit integers, text): each wider token
    // fences the one before, and committer and record tokens read back exactly.
    let mut below = tok(11);
    let mut seq = 2;
    for t in [999, 1_000, (1 << 31) - 1, 1 << 31, 1 << 32, (1 << 32) + 1, crate::FencingToken::MAX.get()] {
        seq += 1;
        fx.sink.append(ColdBatch::single(o.clone(), tok(t), puts(&o, seq..=seq, t))).await.expect("a wider token");
        assert_eq!(fx.sink.watermark(&o).await.expect("wm"), Watermark { through: seq, token: tok(t) }, "{t}");
        let e = fx
            .sink
            .append(ColdBatch::single(o.clone(), below, puts(&o, seq + 1..=seq + 1, below.get())))
            .await
            .expect_err("the narrower token is stale");
        assert!(e.is_fenced(), "{below} after {t}: {e}");
        below = tok(t);
    }
    let tokens: Vec<u64> =
        fx.sink.read_changes(&o, 1, AsOf::Latest).await.expect("read").iter().map(|c| c.token.get()).collect();
    assert_eq!(
        tokens,
        [11, 999, 1_000, (1 << 31) - 1, 1 << 31, 1 << 32, (1 << 32) + 1, crate::FencingToken::MAX.get()]
    );
}

/// An empty batch (or one with no records) creates no snapshot.
pub async fn empty_batch_creates_no_snapshot(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let c = fx.sink.append(ColdBatch::default()).await.expect("empty");
    assert_eq!(c.snapshot, None);
    let c = fx.sink.append(ColdBatch::single(oid("o1"), tok(1), vec![])).await.expect("no records");
    assert_eq!(c.snapshot, None);
    assert!(fx.sink.snapshots().await.expect("snaps").is_empty());
    assert_eq!(fx.sink.head(&oid("o1")).await.expect("head of an empty table"), (None, Watermark::default()));
    let st = fx.sink.load_state(&oid("o1"), AsOf::Latest).await.expect("load empty table");
    assert!(st.entries.is_empty());
    assert_eq!(st.through, 0);
    let changes = fx.sink.read_changes(&oid("o1"), 0, AsOf::Latest).await.expect("changes of an empty table");
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(fx.sink.watermarks(&[oid("o1")]).await.expect("watermarks of an empty table"), [Watermark::default()]);
}

/// A batch that replays a prefix of one object's committed changes (a drain capped by
/// `flush_batch_records` re-sending what a crash left untruncated) beside new changes of
/// another keeps the first object's watermark: `through` never goes down. A sink that wrote the
/// last record sent as every object's `through` lowered it, and the next drain wrote the changes
/// after it again.
pub async fn a_replayed_prefix_beside_new_changes_keeps_the_watermark(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let (a, b) = (oid("a"), oid("b"));
    fx.sink.append(ColdBatch::single(a.clone(), tok(1), puts(&a, 1..=5, 1))).await.expect("a");
    let mixed = ColdBatch {
        objects: vec![
            ObjectChanges { object: a.clone(), token: tok(1), records: puts(&a, 1..=2, 1) },
            ObjectChanges { object: b.clone(), token: tok(1), records: puts(&b, 1..=1, 1) },
        ],
    };
    let c = fx.sink.append(mixed).await.expect("a replayed prefix beside new changes");
    assert_eq!((c.records_written, c.records_skipped), (1, 2), "{c:?}");
    assert_eq!(c.watermarks.get(&a).map(|w| w.through), Some(5), "{c:?}");
    assert_eq!(fx.sink.watermark(&a).await.expect("watermark").through, 5);
    let c = fx.sink.append(ColdBatch::single(a.clone(), tok(1), puts(&a, 2..=3, 1))).await.expect("a replay alone");
    assert_eq!((c.records_written, c.snapshot), (0, None), "{c:?}");
    assert_eq!(c.watermarks.get(&a).map(|w| w.through), Some(5), "{c:?}");
    let c = fx.sink.append(ColdBatch::single(a.clone(), tok(1), puts(&a, 6..=6, 1))).await.expect("the next change");
    assert_eq!(c.records_written, 1, "{c:?}");
    let seqs: Vec<u64> = fx.sink.read_changes(&a, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=6).collect::<Vec<_>>(), "each change once");
}

/// If one object of a batch is fenced or invalid, nothing of the batch is committed.
pub async fn multi_object_batch_is_all_or_nothing(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let (a, b) = (oid("a"), oid("b"));
    fx.sink.append(ColdBatch::single(b.clone(), tok(9), puts(&b, 1..=1, 9))).await.expect("b");
    let batch = ColdBatch {
        objects: vec![
            ObjectChanges { object: a.clone(), token: tok(1), records: puts(&a, 1..=3, 1) },
            ObjectChanges { object: b.clone(), token: tok(2), records: puts(&b, 2..=2, 2) },
        ],
    };
    assert!(fx.sink.append(batch).await.expect_err("b is fenced").is_fenced());
    assert_eq!(fx.sink.watermark(&a).await.expect("wm").through, 0, "a must not be committed");
    let gap = ColdBatch {
        objects: vec![
            ObjectChanges { object: a.clone(), token: tok(1), records: puts(&a, 1..=3, 1) },
            ObjectChanges { object: b.clone(), token: tok(9), records: puts(&b, 3..=3, 9) },
        ],
    };
    assert_eq!(fx.sink.append(gap).await.expect_err("b has a gap").kind(), &ErrorKind::InvalidInput);
    assert_eq!(fx.sink.watermark(&a).await.expect("wm").through, 0, "a must not be committed");
    assert_eq!(fx.sink.snapshots().await.expect("snaps").len(), 1, "no snapshot for a refused batch");
    let dup = ColdBatch {
        objects: vec![
            ObjectChanges { object: a.clone(), token: tok(1), records: puts(&a, 1..=1, 1) },
            ObjectChanges { object: a.clone(), token: tok(1), records: puts(&a, 2..=2, 1) },
        ],
    };
    assert_eq!(fx.sink.append(dup).await.expect_err("dup object").kind(), &ErrorKind::InvalidInput);
    let ok = ColdBatch {
        objects: vec![
            ObjectChanges { object: a.clone(), token: tok(1), records: puts(&a, 1..=3, 1) },
            ObjectChanges { object: b.clone(), token: tok(9), records: puts(&b, 1..=2, 9) },
        ],
    };
    let c = fx.sink.append(ok).await.expect("both");
    assert_eq!((c.records_written, c.records_skipped), (4, 1));
    let snaps = fx.sink.snapshots().await.expect("snapshots");
    assert_eq!(snaps.last().map(|s| s.added_records), Some(4), "the snapshot added what was new: {snaps:?}");
    assert_eq!(c.watermarks.len(), 2, "{:?}", c.watermarks);
    assert_eq!(c.watermarks.get(&a), Some(&Watermark { through: 3, token: tok(1) }));
    assert_eq!(c.watermarks.get(&b), Some(&Watermark { through: 2, token: tok(9) }));
    assert_eq!(fx.sink.snapshots().await.expect("snaps").len(), 2);
}

/// A record no hot store could take back (an empty key or one with a control character, a value
/// over the limit, an empty type name, a `NONE` record token or one above `FencingToken::MAX`),
/// or a batch whose committer token is `NONE` or above `MAX`, is refused with a typed error, and
/// nothing of its batch is committed (the other object's records included).
pub async fn invalid_records_are_refused_and_nothing_committed(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let (a, b) = (oid("a"), oid("b"));
    type Damage = fn(&mut ChangeRecord);
    // Each with the kind the hot contract gives it (`LimitExceeded`: a key or value over its
    // limit), so a record refused by a hot store is refused alike by cold storage.
    let cases: [(&str, bool, Damage); 11] = [
        ("empty key", false, |r| r.key = String::new()),
        ("key with a control character", false, |r| r.key = "k\n1".into()),
        ("key over the limit in bytes, under it in characters", true, |r| {
            r.key = "é".repeat(crate::MAX_KEY_BYTES / 2 + 1)
        }),
        ("value over the limit", true, |r| r.value = Bytes::from(vec![7u8; MAX_VALUE_BYTES + 1])),
        ("empty type name", false, |r| r.type_name = String::new()),
        ("type name over the limit", false, |r| r.type_name = "T".repeat(crate::MAX_TYPE_NAME_BYTES + 1)),
        ("type name with a control character", false, |r| r.type_name = "T\t".into()),
        ("record token NONE", false, |r| r.token = FencingToken::NONE),
        ("record token above MAX", false, |r| r.token = FencingToken::new(FencingToken::MAX.get() + 1)),
        ("record of another object", false, |r| r.object = oid("a")),
        ("sequence number 0", false, |r| r.seq = 0),
    ];
    let kind_ok = |e: &crate::Error, over_a_limit: bool| {
        if over_a_limit {
            matches!(e.kind(), ErrorKind::LimitExceeded { .. })
        } else {
            e.kind() == &ErrorKind::InvalidInput
        }
    };
    for (what, over_a_limit, damage) in cases {
        let mut bad = puts(&b, 1..=2, 1);
        damage(&mut bad[1]);
        let batch = ColdBatch {
            objects: vec![
                ObjectChanges { object: a.clone(), token: tok(1), records: puts(&a, 1..=2, 1) },
                ObjectChanges { object: b.clone(), token: tok(1), records: bad },
            ],
        };
        let e = fx.sink.append(batch).await.expect_err(what);
        assert!(kind_ok(&e, over_a_limit), "{what}: the typed input error of its kind, got {e}");
        assert_eq!(fx.sink.watermark(&a).await.expect("wm").through, 0, "{what}: nothing of the batch committed");
        assert_eq!(fx.sink.watermark(&b).await.expect("wm").through, 0, "{what}: nothing of the batch committed");
    }
    // A lone record at sequence number 0: in the batches above the record before it refuses
    // it first (seq 0 does not follow 1), so a sink lacking the rule itself passed them, and
    // took this one for a replay of what it has (`Ok`, nothing written).
    let mut zero = puts(&b, 1..=1, 1);
    zero[0].seq = 0;
    let e = fx.sink.append(ColdBatch::single(b.clone(), tok(1), zero)).await.expect_err("sequence number 0 alone");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "sequence number 0 alone: {e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    for (what, token) in [
        ("committer token NONE", FencingToken::NONE),
        ("committer token above MAX", FencingToken::new(FencingToken::MAX.get() + 1)),
    ] {
        let batch = ColdBatch {
            objects: vec![
                ObjectChanges { object: a.clone(), token: tok(1), records: puts(&a, 1..=2, 1) },
                ObjectChanges { object: b.clone(), token, records: puts(&b, 1..=2, 1) },
            ],
        };
        let e = fx.sink.append(batch).await.expect_err(what);
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{what}: {e}");
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
        assert_eq!(fx.sink.watermark(&a).await.expect("wm").through, 0, "{what}: nothing of the batch committed");
        assert_eq!(fx.sink.watermark(&b).await.expect("wm").through, 0, "{what}: nothing of the batch committed");
    }
    assert!(fx.sink.snapshots().await.expect("snaps").is_empty(), "no snapshot for a refused batch");
    fx.sink.append(ColdBatch::single(b.clone(), tok(1), puts(&b, 1..=2, 1))).await.expect("the valid batch");
    // A bad record among the replays a batch repeats (seqs cold already has) refuses the batch
    // too: a sink that checks only the records it writes committed the rest.
    for (what, over_a_limit, damage) in cases.iter() {
        let mut replay = puts(&b, 1..=3, 1);
        damage(&mut replay[0]);
        let e = fx.sink.append(ColdBatch::single(b.clone(), tok(1), replay)).await.expect_err(what);
        assert!(kind_ok(&e, *over_a_limit), "{what} in a replayed record: the typed input error of its kind, got {e}");
        assert_eq!(
            fx.sink.watermark(&b).await.expect("wm").through,
            2,
            "{what} in a replayed record: nothing committed"
        );
    }
}

/// State, change order, lookups and scans follow sequence numbers, not timestamps: the records
/// of one write share a timestamp, and a holder whose clock is behind its predecessor's stamps
/// later changes with earlier times. A backend that picks each key's latest version by time
/// (or sorts changes by time) serves superseded values.
pub async fn state_follows_sequence_not_time(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let o = oid("skewed");
    let at = |ms: u64| KIT_EPOCH.plus(std::time::Duration::from_millis(ms));
    // The first holder's clock is ahead: its three changes at 10 ms.
    let mut first =
        vec![rec(&o, 1, "k", Some("old"), 1), rec(&o, 2, "j", Some("j1"), 1), rec(&o, 3, "m", Some("m1"), 1)];
    first.iter_mut().for_each(|r| r.timestamp = at(10));
    // The next holder's clock is behind: its later changes at 2 ms, one write's at one instant.
    let mut second = vec![
        rec(&o, 4, "k", Some("new"), 2),
        rec(&o, 5, "j", None, 2),
        rec(&o, 6, "m", Some("m2"), 2),
        rec(&o, 7, "m", Some("m3"), 2),
    ];
    second.iter_mut().for_each(|r| r.timestamp = at(2));
    fx.sink.append(ColdBatch::single(o.clone(), tok(1), first)).await.expect("first holder");
    fx.sink.append(ColdBatch::single(o.clone(), tok(2), second)).await.expect("second holder");
    let st = fx.sink.load_state(&o, AsOf::Latest).await.expect("state");
    assert_eq!(
        st.entries.iter().map(|e| (e.key.as_str(), &e.value[..], e.seq)).collect::<Vec<_>>(),
        [("k", &b"new"[..], 4), ("m", &b"m3"[..], 7)],
        "each key's change of the highest sequence number wins, whatever its time"
    );
    let log = fx.sink.read_changes(&o, 0, AsOf::Latest).await.expect("changes");
    assert_eq!(log.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6, 7], "in sequence order");
    assert_eq!(log[5].timestamp, at(2), "timestamps kept as written");
    if !has_accel(&fx, "state_follows_sequence_not_time (accelerator part)") {
        return;
    }
    let a = accel(&fx);
    let k = a.lookup(&o, "k", AsOf::Latest).await.expect("lookup").value.expect("k is live");
    assert_eq!((&k.value[..], k.seq), (&b"new"[..], 4));
    assert_eq!(a.lookup(&o, "j", AsOf::Latest).await.expect("lookup").value, None, "j was deleted after it was put");
    let m = a.lookup(&o, "m", AsOf::Latest).await.expect("lookup").value.expect("m is live");
    assert_eq!((&m.value[..], m.seq), (&b"m3"[..], 7), "of two changes at one instant the later seq wins");
    let all = a.scan(ScanQuery::object(o.clone())).await.expect("scan");
    assert_eq!(
        all.entries.iter().map(|e| (e.key.as_str(), &e.value[..])).collect::<Vec<_>>(),
        [("k", &b"new"[..]), ("m", &b"m3"[..])]
    );
    // Time filters apply to each key's latest change (by seq): at 10 ms only superseded ones.
    let mut q = ScanQuery::object(o.clone());
    q.time_range = Some((at(10), at(11)));
    assert!(a.scan(q).await.expect("scan").entries.is_empty(), "no key's latest change is at 10 ms");
    let mut q = ScanQuery::object(o.clone());
    q.time_range = Some((at(2), at(3)));
    assert_eq!(a.scan(q).await.expect("scan").entries.len(), 2, "both live keys' latest changes are at 2 ms");
}

/// Deletes remove keys from recovered state; older snapshots (by id and by time) show the
/// older state.
pub async fn deletes_apply_and_time_travel_reads_older_snapshots(f: &ColdFactory) {
    let (fx, clock) = open(f).await;
    let o = oid("o1");
    let c1 = fx
        .sink
        .append(ColdBatch::single(
            o.clone(),
            tok(1),
            vec![rec(&o, 1, "a", Some("1"), 1), rec(&o, 2, "b", Some("2"), 1)],
        ))
        .await
        .expect("c1");
    clock.advance(std::time::Duration::from_secs(1));
    let c2 = fx
        .sink
        .append(ColdBatch::single(o.clone(), tok(1), vec![rec(&o, 3, "a", None, 1), rec(&o, 4, "b", Some("3"), 1)]))
        .await
        .expect("c2");
    let latest = fx.sink.load_state(&o, AsOf::Latest).await.expect("latest");
    assert_eq!(latest.entries.iter().map(|e| (e.key.as_str(), &e.value[..])).collect::<Vec<_>>(), [("b", &b"3"[..])]);
    assert_eq!(latest.through, 4);
    let s1 = c1.snapshot.expect("snapshot");
    let old = fx.sink.load_state(&o, AsOf::Snapshot(s1)).await.expect("as of c1");
    assert_eq!(old.entries.len(), 2);
    assert_eq!(old.through, 2);
    assert_eq!(old.snapshot, Some(s1));
    let snaps = fx.sink.snapshots().await.expect("snaps");
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[1].parent, Some(s1));
    assert_eq!(Some(snaps[1].id), c2.snapshot);
    // The kit's clock moved a second between the two commits: a backend that ignores the clock
    // it was given fails here.
    assert!(snaps[0].committed_at < snaps[1].committed_at, "{:?} then {:?}", snaps[0], snaps[1]);
    let by_time = fx.sink.load_state(&o, AsOf::Timestamp(snaps[0].committed_at)).await.expect("by time");
    assert_eq!(by_time.snapshot, Some(s1));
    assert_eq!(by_time.entries, old.entries);
    let before_all = fx.sink.load_state(&o, AsOf::Timestamp(Timestamp::EPOCH)).await.expect("before any snapshot");
    assert!(before_all.entries.is_empty());
    // A delete as the newest change counts in `through` (a sink that took the highest seq of the
    // live entries answered 4: a restore then issued seq 5 again, and cold skipped it).
    clock.advance(std::time::Duration::from_secs(1));
    let c3 = fx.sink.append(ColdBatch::single(o.clone(), tok(1), vec![rec(&o, 5, "b", None, 1)])).await.expect("c3");
    let st = fx.sink.load_state(&o, AsOf::Latest).await.expect("latest");
    assert_eq!((st.entries.len(), st.through, st.snapshot), (0, 5, c3.snapshot), "a trailing delete counts");
    let head = fx.sink.head(&o).await.expect("head");
    assert_eq!(head, (c3.snapshot, Watermark { through: 5, token: tok(1) }));
    // An older snapshot that holds a delete (of `a`) is read with it applied, by id and by time,
    // and the later delete (of `b`) is not applied to it.
    let s2 = c2.snapshot.expect("snapshot");
    let live = |st: &crate::ColdState| st.entries.iter().map(|e| (e.key.clone(), e.value.clone())).collect::<Vec<_>>();
    let want = vec![("b".to_string(), Bytes::from_static(b"3"))];
    let at_c2 = fx.sink.load_state(&o, AsOf::Snapshot(s2)).await.expect("as of c2");
    assert_eq!((live(&at_c2), at_c2.through, at_c2.snapshot), (want.clone(), 4, Some(s2)), "as of c2");
    let at_c2_time = fx.sink.load_state(&o, AsOf::Timestamp(snaps[1].committed_at)).await.expect("c2's time");
    assert_eq!((live(&at_c2_time), at_c2_time.through, at_c2_time.snapshot), (want, 4, Some(s2)), "at c2's time");
    if let Some(a) = fx.accel.as_deref() {
        assert_eq!(a.lookup(&o, "a", AsOf::Snapshot(s2)).await.expect("lookup").value, None, "a deleted as of c2");
        let b_then = a.lookup(&o, "b", AsOf::Snapshot(s2)).await.expect("lookup").value.expect("b live as of c2");
        assert_eq!((&b_then.value[..], b_then.seq), (&b"3"[..], 4));
        let scan = a.scan(ScanQuery::object(o.clone()).as_of(AsOf::Snapshot(s2))).await.expect("scan as of c2");
        assert_eq!(scan.entries.into_iter().map(|e| e.key).collect::<Vec<_>>(), ["b"]);
    }
}

/// `AsOf::Timestamp` reads the latest snapshot committed at or before the time: between two
/// commits the earlier one, at a commit's own time that commit, far ahead the latest. Through
/// `load_state`, `read_changes` and the accelerator alike.
pub async fn timestamp_reads_pick_the_latest_snapshot_at_or_before(f: &ColdFactory) {
    let (fx, clock) = open(f).await;
    let o = oid("o1");
    let mut at = Vec::new();
    for (i, v) in ["v1", "v2", "v3"].into_iter().enumerate() {
        let seq = i as u64 + 1;
        let c = fx.sink.append(ColdBatch::single(o.clone(), tok(1), vec![rec(&o, seq, "k", Some(v), 1)])).await;
        c.expect("commit");
        at.push(clock.now());
        clock.advance(std::time::Duration::from_secs(1));
    }
    let snaps = fx.sink.snapshots().await.expect("snapshots");
    assert_eq!(snaps.iter().map(|s| s.committed_at).collect::<Vec<_>>(), at, "committed at the kit's clock");
    let half = std::time::Duration::from_millis(500);
    let cases = [
        (at[1].plus(half), Some("v2"), 2),
        (at[2], Some("v3"), 3),
        (at[0], Some("v1"), 1),
        (at[2].plus(std::time::Duration::from_secs(3600)), Some("v3"), 3),
        (Timestamp::EPOCH, None, 0),
    ];
    for (ts, want, through) in cases {
        let st = fx.sink.load_state(&o, AsOf::Timestamp(ts)).await.expect("load by time");
        let got = st.entries.first().map(|e| std::str::from_utf8(&e.value).expect("utf-8").to_string());
        assert_eq!((got.as_deref(), st.through), (want, through), "load_state as of {ts:?}");
        let n = fx.sink.read_changes(&o, 0, AsOf::Timestamp(ts)).await.expect("changes by time").len();
        assert_eq!(n as u64, through, "read_changes as of {ts:?}");
        if let Some(a) = fx.accel.as_ref() {
            let l = a.lookup(&o, "k", AsOf::Timestamp(ts)).await.expect("lookup by time");
            let got = l.value.map(|v| std::str::from_utf8(&v.value).expect("utf-8").to_string());
            assert_eq!(got.as_deref(), want, "lookup as of {ts:?}");
            let sc = a.scan(ScanQuery::object(o.clone()).as_of(AsOf::Timestamp(ts))).await.expect("scan by time");
            assert_eq!(sc.entries.len(), usize::from(want.is_some()), "scan as of {ts:?}");
        }
    }
}

/// Two commits at the same instant of the clock: `AsOf::Timestamp` at that instant reads the
/// later one (the latest snapshot at or before the time), and snapshot ids that were never
/// issued (one above the newest, one between two) are `NotFound`, not a neighbour.
pub async fn same_instant_commits_and_unissued_snapshot_ids(f: &ColdFactory) {
    let (fx, clock) = open(f).await;
    let o = oid("o1");
    let c1 = fx.sink.append(ColdBatch::single(o.clone(), tok(1), vec![rec(&o, 1, "k", Some("v1"), 1)])).await;
    let c1 = c1.expect("c1");
    let c2 = fx.sink.append(ColdBatch::single(o.clone(), tok(1), vec![rec(&o, 2, "k", Some("v2"), 1)])).await;
    let c2 = c2.expect("c2");
    let at = clock.now();
    let st = fx.sink.load_state(&o, AsOf::Timestamp(at)).await.expect("load at the instant");
    assert_eq!((st.snapshot, st.through), (c2.snapshot, 2), "the later of two commits at {at:?}");
    assert_eq!(fx.sink.read_changes(&o, 0, AsOf::Timestamp(at)).await.expect("changes").len(), 2);
    let (s1, s2) = (c1.snapshot.expect("snapshot"), c2.snapshot.expect("snapshot"));
    if let Some(a) = fx.accel.as_ref() {
        let l = a.lookup(&o, "k", AsOf::Timestamp(at)).await.expect("lookup at the instant");
        assert_eq!(l.stats.snapshot, Some(s2), "the later of two commits at the instant");
        assert_eq!(l.value.map(|v| v.value), Some(Bytes::from_static(b"v2")));
        // A scan resolves the instant as a lookup does, and each reports the snapshot it read.
        let sc = a.scan(ScanQuery::object(o.clone()).as_of(AsOf::Timestamp(at))).await.expect("scan at the instant");
        assert_eq!(sc.stats.snapshot, Some(s2), "the later of two commits at the instant");
        assert_eq!(sc.entries.iter().map(|e| e.value.clone()).collect::<Vec<_>>(), [Bytes::from_static(b"v2")]);
        let l = a.lookup(&o, "k", AsOf::Snapshot(s1)).await.expect("lookup as of the first");
        assert_eq!(l.stats.snapshot, Some(s1), "the snapshot asked for");
        assert_eq!(l.value.map(|v| v.value), Some(Bytes::from_static(b"v1")));
        let sc = a.scan(ScanQuery::object(o.clone()).as_of(AsOf::Snapshot(s1))).await.expect("scan as of the first");
        assert_eq!(sc.stats.snapshot, Some(s1), "the snapshot asked for");
        assert_eq!(sc.entries.iter().map(|e| e.value.clone()).collect::<Vec<_>>(), [Bytes::from_static(b"v1")]);
    }
    let ids: Vec<i64> = fx.sink.snapshots().await.expect("snapshots").iter().map(|s| s.id).collect();
    assert_eq!(ids.len(), 2);
    let mut never =
        vec![ids.iter().max().expect("ids").saturating_add(1), ids.iter().min().expect("ids").saturating_sub(1)];
    if s1.abs_diff(s2) > 1 {
        never.push(s1.min(s2) + 1);
    }
    for id in never.into_iter().filter(|id| !ids.contains(id)) {
        let e = fx.sink.load_state(&o, AsOf::Snapshot(id)).await.expect_err("never issued");
        assert_eq!(e.kind(), &ErrorKind::NotFound, "load_state as of {id}: {e}");
        let e = fx.sink.read_changes(&o, 0, AsOf::Snapshot(id)).await.expect_err("never issued");
        assert_eq!(e.kind(), &ErrorKind::NotFound, "read_changes as of {id}: {e}");
        if let Some(a) = fx.accel.as_ref() {
            let e = a.lookup(&o, "k", AsOf::Snapshot(id)).await.expect_err("never issued");
            assert_eq!(e.kind(), &ErrorKind::NotFound, "lookup as of {id}: {e}");
            let e = a.scan(ScanQuery::object(o.clone()).as_of(AsOf::Snapshot(id))).await.expect_err("never issued");
            assert_eq!(e.kind(), &ErrorKind::NotFound, "scan as of {id}: {e}");
        }
    }
}

/// Objects whose ids share a prefix (or contain the separators a backend might join ids and
/// keys with) are independent on every path: state, changes (also `read_changes_through`),
/// watermarks, lookups and scans, also when one batch carries them all.
pub async fn objects_whose_ids_share_a_prefix_are_independent(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let long = format!("o1{}", "x".repeat(crate::ObjectId::MAX_LEN - 2));
    let ids: Vec<ObjectId> =
        ["o1", "o10", "o1/x", "o1:x", "o1.x", "o1@x", "o", long.as_str()].iter().map(|s| oid(s)).collect();
    let records = |i: usize, o: &ObjectId| -> Vec<ChangeRecord> {
        (1..=i as u64 + 1).map(|s| rec(o, s, if s == 1 { "x/k" } else { "k" }, Some(&format!("{o}={s}")), 1)).collect()
    };
    let batch = ColdBatch {
        objects: ids
            .iter()
            .enumerate()
            .map(|(i, o)| ObjectChanges { object: o.clone(), token: tok(1), records: records(i, o) })
            .collect(),
    };
    fx.sink.append(batch).await.expect("one batch of every object");
    for (i, o) in ids.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(fx.sink.watermark(o).await.expect("watermark").through, n, "{o}");
        let changes = fx.sink.read_changes(o, 0, AsOf::Latest).await.expect("changes");
        assert_eq!(changes, records(i, o), "{o}");
        // A sink's own `read_changes_through` too (the runtime compares its answer with hot
        // storage's changes by sequence number: another object's record there reads as damage).
        let through = fx.sink.read_changes_through(o, 0, n, AsOf::Latest).await.expect("changes through");
        assert_eq!(through, records(i, o), "{o}: read_changes_through");
        let st = fx.sink.load_state(o, AsOf::Latest).await.expect("state");
        let want: Vec<(String, Bytes)> = fold_changes(&records(i, o)).0.into_iter().map(|e| (e.key, e.value)).collect();
        assert_eq!(st.entries.into_iter().map(|e| (e.key, e.value)).collect::<Vec<_>>(), want, "{o}");
        if let Some(a) = fx.accel.as_ref() {
            let l = a.lookup(o, "x/k", AsOf::Latest).await.expect("lookup");
            assert_eq!(l.value.map(|v| v.value), Some(Bytes::from(format!("{o}=1"))), "{o}");
            let sc = a.scan(ScanQuery::object(o.clone())).await.expect("scan");
            assert_eq!(sc.entries.len(), if n > 1 { 2 } else { 1 }, "{o}: {:?}", sc.entries);
        }
    }
}

/// Reading a snapshot that does not exist is `NotFound`.
pub async fn unknown_snapshot_is_not_found(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let o = oid("o1");
    fx.sink.append(ColdBatch::single(o.clone(), tok(1), puts(&o, 1..=1, 1))).await.expect("append");
    let e = fx.sink.load_state(&o, AsOf::Snapshot(-4242)).await.expect_err("unknown");
    assert_eq!(e.kind(), &ErrorKind::NotFound);
    let e = fx.sink.read_changes(&o, 0, AsOf::Snapshot(-4242)).await.expect_err("unknown");
    assert_eq!(e.kind(), &ErrorKind::NotFound, "read_changes: {e}");
    if let Some(a) = fx.accel.as_ref() {
        assert_eq!(a.lookup(&o, "k1", AsOf::Snapshot(-4242)).await.expect_err("unknown").kind(), &ErrorKind::NotFound);
        let e = a.scan(ScanQuery::object(o.clone()).as_of(AsOf::Snapshot(-4242))).await.expect_err("unknown");
        assert_eq!(e.kind(), &ErrorKind::NotFound, "scan: {e}");
    }
}

/// `read_changes` returns records after a sequence number, in order, with all fields intact;
/// `read_changes_through` the ones in a range `(after, through]`, as of a snapshot too.
pub async fn read_changes_after_a_sequence(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let o = oid("o1");
    let recs = vec![rec(&o, 1, "a", Some("1"), 3), rec(&o, 2, "a", None, 3), rec(&o, 3, "b", Some("x"), 3)];
    let c1 = fx.sink.append(ColdBatch::single(o.clone(), tok(3), recs[..2].to_vec())).await.expect("c1");
    fx.sink.append(ColdBatch::single(o.clone(), tok(3), recs[2..].to_vec())).await.expect("c2");
    let s1 = AsOf::Snapshot(c1.snapshot.expect("snapshot"));
    assert_eq!(fx.sink.read_changes(&o, 0, s1).await.expect("as of c1"), recs[..2].to_vec());
    assert_eq!(fx.sink.read_changes(&o, 0, AsOf::Latest).await.expect("all"), recs);
    assert_eq!(fx.sink.read_changes(&o, 1, AsOf::Latest).await.expect("after 1"), recs[1..].to_vec());
    assert!(fx.sink.read_changes(&o, 3, AsOf::Latest).await.expect("none").is_empty());
    assert!(fx.sink.read_changes(&oid("nobody"), 0, AsOf::Latest).await.expect("unknown object").is_empty());
    let through = |after, through, as_of| fx.sink.read_changes_through(&o, after, through, as_of);
    assert_eq!(through(0, 1, AsOf::Latest).await.expect("1"), recs[..1].to_vec());
    assert_eq!(through(1, 2, AsOf::Latest).await.expect("2"), recs[1..2].to_vec());
    assert_eq!(through(0, 2, AsOf::Latest).await.expect("1..=2"), recs[..2].to_vec());
    assert_eq!(through(1, 9, AsOf::Latest).await.expect("2.."), recs[1..].to_vec());
    assert_eq!(through(0, 3, s1).await.expect("as of c1"), recs[..2].to_vec());
    assert!(through(2, 2, AsOf::Latest).await.expect("empty range").is_empty());
    assert!(through(3, 1, AsOf::Latest).await.expect("inverted range").is_empty());
}

/// Change records keep their timestamps to the microsecond (`Timestamp`'s resolution): a store
/// that keeps milliseconds changes records on the way back and picks wrong versions at time
/// boundaries.
pub async fn records_keep_microsecond_timestamps(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let o = oid("o1");
    let mut recs = puts(&o, 1..=3, 1);
    for (i, r) in recs.iter_mut().enumerate() {
        r.timestamp = KIT_EPOCH.plus(std::time::Duration::from_micros(1_000 * i as u64 + 1 + 7 * i as u64));
    }
    fx.sink.append(ColdBatch::single(o.clone(), tok(1), recs.clone())).await.expect("append");
    assert_eq!(fx.sink.read_changes(&o, 0, AsOf::Latest).await.expect("changes"), recs);
}

/// Values at the 2 MiB limit round-trip byte for byte.
pub async fn large_values_roundtrip(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let o = oid("o1");
    let big: Vec<u8> = (0..MAX_VALUE_BYTES).map(|i| (i * 7 % 256) as u8).collect();
    let mut r = rec(&o, 1, "big", None, 1);
    r.op = Op::Put;
    r.value = Bytes::from(big.clone());
    fx.sink.append(ColdBatch::single(o.clone(), tok(1), vec![r])).await.expect("append");
    let st = fx.sink.load_state(&o, AsOf::Latest).await.expect("load");
    assert_eq!(st.entries.len(), 1);
    assert!(st.entries[0].value[..] == big[..], "2 MiB value differs after the round trip");
}

/// Empty values, keys of exactly 1 KiB (also in two-byte characters) and type names of exactly
/// 256 bytes round-trip whole: an empty put stays a put (not a delete, whose value is empty
/// too), and no key or type name is cut short (which would merge keys).
pub async fn empty_values_and_names_at_the_limit_roundtrip(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    let o = oid("o1");
    let max = crate::MAX_KEY_BYTES;
    let keys = ["empty".to_string(), "a".repeat(max), format!("{}b", "a".repeat(max - 1)), "é".repeat(max / 2)];
    let ty = "t".repeat(crate::ids::MAX_TYPE_NAME_BYTES);
    let first: Vec<ChangeRecord> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let mut r = rec(&o, i as u64 + 1, k, Some(if i == 0 { "" } else { "v" }), 1);
            r.type_name = ty.clone();
            r
        })
        .collect();
    fx.sink.append(ColdBatch::single(o.clone(), tok(1), first.clone())).await.expect("append");
    assert_eq!(fx.sink.read_changes(&o, 0, AsOf::Latest).await.expect("changes"), first, "every record whole");
    let st = fx.sink.load_state(&o, AsOf::Latest).await.expect("load");
    let mut want: Vec<(&str, &[u8])> =
        keys.iter().enumerate().map(|(i, k)| (k.as_str(), if i == 0 { &b""[..] } else { &b"v"[..] })).collect();
    want.sort_unstable();
    let got: Vec<(&str, &[u8])> = st.entries.iter().map(|e| (e.key.as_str(), &e.value[..])).collect();
    assert_eq!(got, want, "the empty put is live, every key whole");
    if let Some(a) = fx.accel.as_deref() {
        let l = a.lookup(&o, "empty", AsOf::Latest).await.expect("lookup");
        let v = l.value.expect("an empty put is live");
        assert_eq!((v.op, v.value.len(), v.type_name.len()), (Op::Put, 0, ty.len()));
    }
    // Deleting it afterwards removes it; the put's record stays as it was.
    let del = rec(&o, 5, "empty", None, 1);
    fx.sink.append(ColdBatch::single(o.clone(), tok(1), vec![del.clone()])).await.expect("delete");
    let st = fx.sink.load_state(&o, AsOf::Latest).await.expect("load");
    assert_eq!(st.entries.len(), keys.len() - 1);
    assert!(st.entries.iter().all(|e| e.key != "empty"), "deleted");
    let log = fx.sink.read_changes(&o, 0, AsOf::Latest).await.expect("changes");
    assert_eq!((log[0].op, log[4].op), (Op::Put, Op::Delete));
}

async fn seed_three_commits(fx: &ColdFixture) -> (ObjectId, Vec<i64>) {
    let o = oid("acc");
    let other = oid("zzz-other");
    let mut snaps = Vec::new();
    let mut b1 = vec![rec(&o, 1, "a", Some("a1"), 1), rec(&o, 2, "b", Some("b1"), 1), rec(&o, 3, "c", Some("c1"), 1)];
    b1[2].type_name = "Other".into();
    let c = fx.sink.append(ColdBatch::single(o.clone(), tok(1), b1)).await.expect("c1");
    snaps.push(c.snapshot.expect("snapshot"));
    let c = fx.sink.append(ColdBatch::single(other.clone(), tok(1), puts(&other, 1..=20, 1))).await.expect("other");
    snaps.push(c.snapshot.expect("snapshot"));
    let c = fx
        .sink
        .append(ColdBatch::single(o.clone(), tok(2), vec![rec(&o, 4, "a", Some("a2"), 2), rec(&o, 5, "b", None, 2)]))
        .await
        .expect("c3");
    snaps.push(c.snapshot.expect("snapshot"));
    (o, snaps)
}

/// An accelerator handle answers `Latest` with each new commit: after a lookup and a scan, a
/// commit that overwrites one key and deletes another is seen by the same handle at once (no
/// cached head), with the new snapshot in the stats.
pub async fn accelerator_sees_each_new_commit(f: &ColdFactory) {
    let (fx, clock) = open(f).await;
    if !has_accel(&fx, "accelerator_sees_each_new_commit") {
        return;
    }
    let o = oid("fresh");
    let a = accel(&fx);
    let keys = |s: crate::Scan| s.entries.into_iter().map(|e| (e.key, e.value)).collect::<Vec<_>>();
    let c1 = fx
        .sink
        .append(ColdBatch::single(
            o.clone(),
            tok(1),
            vec![rec(&o, 1, "k", Some("v1"), 1), rec(&o, 2, "j", Some("j1"), 1)],
        ))
        .await
        .expect("c1");
    let l = a.lookup(&o, "k", AsOf::Latest).await.expect("lookup");
    assert_eq!((l.value.map(|v| v.value), l.stats.snapshot), (Some(Bytes::from_static(b"v1")), c1.snapshot));
    let both = vec![("j".to_string(), Bytes::from_static(b"j1")), ("k".to_string(), Bytes::from_static(b"v1"))];
    assert_eq!(keys(a.scan(ScanQuery::object(o.clone())).await.expect("scan")), both);
    clock.advance(std::time::Duration::from_secs(1));
    let c2 = fx
        .sink
        .append(ColdBatch::single(o.clone(), tok(1), vec![rec(&o, 3, "k", Some("v2"), 1), rec(&o, 4, "j", None, 1)]))
        .await
        .expect("c2");
    assert_ne!(c2.snapshot, c1.snapshot);
    let l = a.lookup(&o, "k", AsOf::Latest).await.expect("lookup after c2");
    assert_eq!(l.stats.snapshot, c2.snapshot, "the lookup read the new head");
    let v = l.value.expect("k live");
    assert_eq!((&v.value[..], v.seq), (&b"v2"[..], 3));
    assert_eq!(a.lookup(&o, "j", AsOf::Latest).await.expect("lookup j").value, None, "j deleted by c2");
    let scan = a.scan(ScanQuery::object(o.clone())).await.expect("scan after c2");
    assert_eq!(scan.stats.snapshot, c2.snapshot);
    assert_eq!(keys(scan), [("k".to_string(), Bytes::from_static(b"v2"))]);
}

/// Lookups return the latest version, treat deletes as absent and honour `AsOf`.
pub async fn lookup_finds_latest_and_respects_deletes(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    if !has_accel(&fx, "lookup_finds_latest_and_respects_deletes") {
        return;
    }
    let (o, snaps) = seed_three_commits(&fx).await;
    let a = accel(&fx);
    let l = a.lookup(&o, "a", AsOf::Latest).await.expect("lookup");
    let v = l.value.expect("a is live");
    assert_eq!((&v.value[..], v.seq, v.op), (&b"a2"[..], 4, Op::Put));
    assert_eq!(l.stats.snapshot, Some(snaps[2]));
    assert_eq!(a.lookup(&o, "b", AsOf::Latest).await.expect("lookup").value, None, "b was deleted");
    assert_eq!(a.lookup(&o, "nope", AsOf::Latest).await.expect("lookup").value, None);
    assert_eq!(a.lookup(&oid("unknown"), "a", AsOf::Latest).await.expect("lookup").value, None);
    let old = a.lookup(&o, "b", AsOf::Snapshot(snaps[0])).await.expect("as of").value.expect("b was live then");
    assert_eq!(&old.value[..], b"b1");
    assert_eq!(old.timestamp, KIT_EPOCH.plus(std::time::Duration::from_millis(2)));
    assert_eq!(old.type_name, "T");
}

/// Scans honour key ranges, type names, time ranges and limits, over the latest live versions.
pub async fn scan_filters_by_range_type_and_time(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    if !has_accel(&fx, "scan_filters_by_range_type_and_time") {
        return;
    }
    let (o, snaps) = seed_three_commits(&fx).await;
    let a = accel(&fx);
    let keys = |s: crate::Scan| s.entries.into_iter().map(|e| e.key).collect::<Vec<_>>();
    assert_eq!(keys(a.scan(ScanQuery::object(o.clone())).await.expect("all")), ["a", "c"]);
    assert_eq!(
        keys(a.scan(ScanQuery::object(o.clone()).as_of(AsOf::Snapshot(snaps[0]))).await.expect("old")),
        ["a", "b", "c"]
    );
    assert_eq!(
        keys(a.scan(ScanQuery::object(o.clone()).keys(KeyRange::between("b", "z"))).await.expect("range")),
        ["c"]
    );
    let mut q = ScanQuery::object(o.clone());
    q.type_name = Some("Other".into());
    assert_eq!(keys(a.scan(q).await.expect("type")), ["c"]);
    let mut q = ScanQuery::object(o.clone());
    q.time_range = Some((
        KIT_EPOCH.plus(std::time::Duration::from_millis(3)),
        KIT_EPOCH.plus(std::time::Duration::from_millis(5)),
    ));
    assert_eq!(keys(a.scan(q).await.expect("time")), ["a", "c"]);
    // Filters apply to each key's latest version: in [1, 3) ms only a1 and b1 were written,
    // both superseded since (b by its delete), so nothing matches.
    let mut q = ScanQuery::object(o.clone());
    q.time_range = Some((
        KIT_EPOCH.plus(std::time::Duration::from_millis(1)),
        KIT_EPOCH.plus(std::time::Duration::from_millis(3)),
    ));
    assert_eq!(keys(a.scan(q).await.expect("time")), Vec::<String>::new(), "filtered before folding");
    let mut q = ScanQuery::object(o.clone());
    q.limit = Some(1);
    assert_eq!(keys(a.scan(q).await.expect("limit")), ["a"]);
    let mut q = ScanQuery::object(o.clone());
    q.limit = Some(0);
    assert_eq!(keys(a.scan(q).await.expect("limit 0")), Vec::<String>::new(), "at most 0 entries");
    // The limit counts live, matching entries: b (deleted) and filtered keys take no place.
    let mut q = ScanQuery::object(o.clone());
    q.limit = Some(2);
    assert_eq!(keys(a.scan(q).await.expect("limit")), ["a", "c"]);
    let mut q = ScanQuery::object(o.clone());
    q.type_name = Some("Other".into());
    q.limit = Some(1);
    assert_eq!(keys(a.scan(q).await.expect("type and limit")), ["c"]);
    assert!(a.scan(ScanQuery::object(oid("unknown"))).await.expect("unknown").entries.is_empty());
}

/// A scan's type filter applies to each key's latest version, and a scan as of an older
/// snapshot or time returns that snapshot's values: a key written as one type and later as
/// another matches only the later type (a filter applied before folding returned its older
/// version); a scan picking the snapshot after the time returned newer values with the right
/// count.
pub async fn scan_filters_and_time_travel_apply_to_the_right_versions(f: &ColdFactory) {
    let (fx, clock) = open(f).await;
    if !has_accel(&fx, "scan_filters_and_time_travel_apply_to_the_right_versions") {
        return;
    }
    let o = oid("retyped");
    let mut first = vec![rec(&o, 1, "c", Some("c1"), 1), rec(&o, 2, "d", Some("d1"), 1)];
    first[0].type_name = "Other".into();
    let c1 = fx.sink.append(ColdBatch::single(o.clone(), tok(1), first)).await.expect("c1");
    let after_first = clock.now();
    clock.advance(std::time::Duration::from_millis(10));
    fx.sink.append(ColdBatch::single(o.clone(), tok(1), vec![rec(&o, 3, "c", Some("c2"), 1)])).await.expect("c2");
    let a = accel(&fx);
    let scan = |type_name: Option<&str>, as_of: AsOf| {
        let mut q = ScanQuery::object(o.clone()).as_of(as_of);
        q.type_name = type_name.map(str::to_string);
        async move {
            let s = a.scan(q).await.expect("scan");
            s.entries
                .into_iter()
                .map(|e| (e.key, String::from_utf8(e.value.to_vec()).expect("utf-8")))
                .collect::<Vec<_>>()
        }
    };
    let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
    assert_eq!(scan(Some("Other"), AsOf::Latest).await, [], "c's latest version is a T");
    assert_eq!(scan(Some("T"), AsOf::Latest).await, [pair("c", "c2"), pair("d", "d1")]);
    let first_snapshot = AsOf::Snapshot(c1.snapshot.expect("snapshot"));
    assert_eq!(scan(Some("Other"), first_snapshot).await, [pair("c", "c1")]);
    assert_eq!(scan(None, first_snapshot).await, [pair("c", "c1"), pair("d", "d1")]);
    let before_second = AsOf::Timestamp(after_first.plus(std::time::Duration::from_millis(5)));
    assert_eq!(scan(None, before_second).await, [pair("c", "c1"), pair("d", "d1")]);
}

/// Query statistics add up, for a lookup of a present key, of an absent key and for a scan:
/// every file of the snapshot read is either pruned (by one means) or opened, and a present key
/// is read from some file.
pub async fn query_stats_are_consistent(f: &ColdFactory) {
    let (fx, _) = open(f).await;
    if !has_accel(&fx, "query_stats_are_consistent") {
        return;
    }
    let (o, _) = seed_three_commits(&fx).await;
    let a = accel(&fx);
    let adds_up = |what: &str, s: &crate::QueryStats| {
        let pruned = s.pruned_by_partition + s.pruned_by_min_max + s.pruned_by_bloom + s.pruned_by_key_index;
        assert!(s.files_total >= 1, "{what}: three commits were made: {s:?}");
        assert_eq!(pruned + s.files_opened, s.files_total, "{what}: every file pruned or opened: {s:?}");
        assert!(s.snapshot.is_some(), "{what}: the snapshot read: {s:?}");
    };
    let s = a.lookup(&o, "a", AsOf::Latest).await.expect("lookup").stats;
    adds_up("lookup of a present key", &s);
    assert!(s.files_opened >= 1, "the key exists, so some file must be read: {s:?}");
    assert!(s.bytes_read > 0, "{s:?}");
    let s = a.lookup(&o, "no-such-key", AsOf::Latest).await.expect("lookup").stats;
    adds_up("lookup of an absent key", &s);
    let s = a.scan(ScanQuery::object(o.clone())).await.expect("scan").stats;
    adds_up("scan", &s);
    assert!(s.files_opened >= 1, "the object has live keys, so some file must be read: {s:?}");
}

/// Keys of the largest size that differ only in their last byte (also inside a multi-byte
/// character), a key that is a prefix of two others, and keys of 2-, 3- and 4-byte characters
/// up to the largest size, each written in a commit of its own: every lookup and scan finds
/// them, now and as of an older snapshot. (An accelerator that prunes by statistics cut to a
/// prefix of the key, or cut inside a character, skips the file that holds one.)
pub async fn accelerator_finds_long_and_multibyte_keys(f: &ColdFactory) {
    use std::ops::Bound::{Excluded, Included, Unbounded};
    let (fx, _) = open(f).await;
    if !has_accel(&fx, "accelerator_finds_long_and_multibyte_keys") {
        return;
    }
    let a = accel(&fx);
    let o = oid("long-keys");
    let max = crate::MAX_KEY_BYTES;
    let base = "a".repeat(max - 1);
    let keys: Vec<String> = vec![
        format!("{base}a"),
        format!("{base}b"),
        base.clone(),
        format!("{}é", "a".repeat(max - 2)),
        "é".repeat(max / 2),
        // é is C3 A9 and ê is C3 AA: the last byte differs.
        format!("{}ê", "é".repeat(max / 2 - 1)),
        "日本".to_string(),
        "日本語".to_string(),
        "😀".repeat(max / 4),
        format!("{}😁", "😀".repeat(max / 4 - 1)),
        "\u{10FFFF}".repeat(max / 4),
    ];
    for k in &keys {
        assert!(crate::ids::validate_key(k).is_ok(), "{} bytes", k.len());
    }
    let mut all = Vec::new();
    let mut snaps = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let r = rec(&o, i as u64 + 1, k, Some(&format!("v{i}")), 1);
        let c = fx.sink.append(ColdBatch::single(o.clone(), tok(1), vec![r.clone()])).await.expect("commit");
        snaps.push(c.snapshot.expect("snapshot"));
        all.push(r);
    }
    // Another object with the same keys, in one commit: its records are no answer for `o`.
    let other = oid("long-keys-other");
    let theirs: Vec<ChangeRecord> =
        keys.iter().enumerate().map(|(i, k)| rec(&other, i as u64 + 1, k, Some("other"), 1)).collect();
    fx.sink.append(ColdBatch::single(other.clone(), tok(1), theirs)).await.expect("other object");
    // Overwrite the first key and delete the fifth.
    let n = keys.len() as u64;
    let last = vec![rec(&o, n + 1, &keys[0], Some("new"), 1), rec(&o, n + 2, &keys[4], None, 1)];
    fx.sink.append(ColdBatch::single(o.clone(), tok(1), last.clone())).await.expect("overwrite and delete");
    all.extend(last);
    fn short(k: &str) -> String {
        format!("{}… ({} bytes)", k.chars().take(8).collect::<String>(), k.len())
    }
    // As of the sixth commit (keys 0 to 5 written), and now.
    for (as_of, count) in [(AsOf::Snapshot(snaps[5]), 6), (AsOf::Latest, all.len())] {
        let want: BTreeMap<String, (Bytes, u64)> =
            fold_changes(&all[..count]).0.into_iter().map(|e| (e.key, (e.value, e.seq))).collect();
        for k in &keys {
            let got = a.lookup(&o, k, as_of).await.expect("lookup").value.map(|v| (v.value, v.seq));
            assert_eq!(got, want.get(k).cloned(), "lookup of {} as of {as_of:?}", short(k));
        }
        let scan = a.scan(ScanQuery::object(o.clone()).as_of(as_of)).await.expect("scan");
        let got: Vec<(String, (Bytes, u64))> = scan.entries.into_iter().map(|v| (v.key, (v.value, v.seq))).collect();
        let want: Vec<(String, (Bytes, u64))> = want.into_iter().collect();
        let names = |v: &[(String, (Bytes, u64))]| v.iter().map(|(k, (_, s))| (short(k), *s)).collect::<Vec<_>>();
        assert_eq!(names(&got[..]), names(&want[..]), "scan as of {as_of:?}");
        assert_eq!(got, want, "scan as of {as_of:?}");
    }
    // Now: each key alone, and ranges whose bounds differ from the keys only in the last byte.
    let live: BTreeMap<String, (Bytes, u64)> =
        fold_changes(&all).0.into_iter().map(|e| (e.key, (e.value, e.seq))).collect();
    let scan_keys = |range: KeyRange, limit: Option<usize>| {
        let acc = a;
        let mut q = ScanQuery::object(o.clone()).keys(range);
        q.limit = limit;
        async move { acc.scan(q).await.expect("scan").entries.into_iter().map(|v| v.key).collect::<Vec<String>>() }
    };
    for k in &keys {
        let got = scan_keys(KeyRange { start: Included(k.clone()), end: Included(k.clone()) }, None).await;
        let want: Vec<String> = live.get(k).map(|_| k.clone()).into_iter().collect();
        assert_eq!(got, want, "a scan of {} alone", short(k));
    }
    let s = |i: usize| keys[i].clone();
    for (range, limit, want) in [
        (KeyRange::prefix(base.clone()), None, vec![s(2), s(0), s(1)]),
        (KeyRange::prefix("é".repeat(max / 2 - 1)), None, vec![s(5)]),
        (KeyRange::prefix("😀".repeat(max / 4 - 1)), None, vec![s(8), s(9)]),
        (KeyRange::prefix("日本"), None, vec![s(6), s(7)]),
        (KeyRange::between(s(0), s(1)), None, vec![s(0)]),
        (KeyRange { start: Excluded(s(0)), end: Unbounded }, Some(1), vec![s(1)]),
        (KeyRange { start: Excluded(s(8)), end: Included(s(9)) }, None, vec![s(9)]),
        (KeyRange { start: Included(s(10)), end: Unbounded }, None, vec![s(10)]),
    ] {
        let what = format!(
            "{:?}..{:?} limit {limit:?}",
            range.start.as_ref().map(|k| short(k.as_str())),
            range.end.as_ref().map(|k| short(k.as_str()))
        );
        assert_eq!(scan_keys(range, limit).await, want, "{what}");
    }
    // The other object kept its own.
    for k in [&keys[0], &keys[1], &keys[4]] {
        let got = a.lookup(&other, k, AsOf::Latest).await.expect("lookup").value.map(|v| v.value);
        assert_eq!(got, Some(Bytes::from_static(b"other")), "lookup of {} in the other object", short(k));
    }
}

// ---------------------------------------------------------------------------------------------
// Model-based property tests.

/// Operations of the cold-sink state machine.
#[derive(Clone, Debug)]
pub enum ColdOp {
    /// Commit `n` new records for object `o` (keys from a small pool, some deletes), optionally
    /// re-sending `overlap` already committed records first (a replay).
    Append {
        /// Object index.
        o: usize,
        /// Number of new records.
        n: usize,
        /// Committed records re-sent first.
        overlap: usize,
        /// Key index and put (true) / delete (false) per new record.
        keys: Vec<(usize, bool)>,
    },
    /// Commit under a token lower than the object's committed one: must be fenced.
    StaleAppend(usize),
    /// A new committer (takeover) bumps the object's token.
    Takeover(usize),
    /// Compare state as of a past snapshot (index into the model's snapshot list).
    CheckAsOf(usize),
}

/// The cold model: per object all committed records and its token; a list of snapshots (how
/// many records each object had at that snapshot).
#[derive(Clone, Debug, Default)]
pub struct ColdModel {
    records: Vec<Vec<(u64, usize, bool)>>,
    tokens: Vec<u64>,
    /// The highest token a snapshot was committed with, per object (what the sink fences on).
    committed: Vec<u64>,
    snapshots: Vec<Vec<usize>>,
}

const COLD_OBJS: usize = 3;
const COLD_KEYS: usize = 6;

struct ColdMachine;

impl ReferenceStateMachine for ColdMachine {
    type State = ColdModel;
    type Transition = ColdOp;

    fn init_state() -> BoxedStrategy<ColdModel> {
        Just(ColdModel {
            records: vec![Vec::new(); COLD_OBJS],
            // From 2, so that after any commit a stale (lower, still valid) token exists.
            tokens: vec![2; COLD_OBJS],
            committed: vec![0; COLD_OBJS],
            snapshots: Vec::new(),
        })
        .boxed()
    }

    fn transitions(_: &ColdModel) -> BoxedStrategy<ColdOp> {
        prop_oneof![
            6 => (0..COLD_OBJS, 0..3usize, proptest::collection::vec((0..COLD_KEYS, proptest::bool::weighted(0.8)), 0..5))
                .prop_map(|(o, overlap, keys)| ColdOp::Append { o, n: keys.len(), overlap, keys }),
            1 => (0..COLD_OBJS).prop_map(ColdOp::StaleAppend),
            1 => (0..COLD_OBJS).prop_map(ColdOp::Takeover),
            2 => (0..8usize).prop_map(ColdOp::CheckAsOf),
        ]
        .boxed()
    }

    fn apply(mut s: ColdModel, t: &ColdOp) -> ColdModel {
        match t {
            ColdOp::Append { o, keys, .. } => {
                let m = &mut s.records[*o];
                for (k, put) in keys {
                    let seq = m.len() as u64 + 1;
                    m.push((seq, *k, *put));
                }
                if !keys.is_empty() {
                    s.committed[*o] = s.tokens[*o];
                    s.snapshots.push(s.records.iter().map(Vec::len).collect());
                }
            }
            ColdOp::Takeover(o) => s.tokens[*o] += 1,
            ColdOp::StaleAppend(_) | ColdOp::CheckAsOf(_) => {}
        }
        s
    }
}

fn model_records(obj: &ObjectId, recs: &[(u64, usize, bool)], token: u64) -> Vec<ChangeRecord> {
    recs.iter()
        .map(|(seq, k, put)| {
            let v = format!("v{seq}");
            rec(obj, *seq, &format!("key{k}"), put.then_some(v.as_str()), token)
        })
        .collect()
}

/// Random appends (with replays of committed records), stale commits and takeovers keep the
/// sink's state, watermarks and every snapshot's state equal to the model; nothing is lost or
/// doubled.
pub fn prop_cold_sink_matches_model(f: &ColdFactory) {
    prop_cold_sink_matches_model_with(f, proptest_cases());
}

/// [`prop_cold_sink_matches_model`] with `cases` in place of [`proptest_cases`] (it runs half).
pub fn prop_cold_sink_matches_model_with(f: &ColdFactory, cases: u32) {
    let rt = runtime();
    let cases = cases.max(1);
    let mut runner =
        TestRunner::new(Config { cases: cases.div_ceil(2), failure_persistence: None, ..Config::default() });
    let stale_checked = std::sync::atomic::AtomicU32::new(0);
    let result = runner.run(&ColdMachine::sequential_strategy(1..14), |(init, ops, _)| {
        rt.block_on(async {
            let (fx, _) = open(f).await;
            let objs: Vec<ObjectId> = (0..COLD_OBJS).map(|i| oid(&format!("c{i}"))).collect();
            let mut model = init;
            let mut snap_ids = Vec::new();
            for op in &ops {
                let next = ColdMachine::apply(model.clone(), op);
                match op {
                    ColdOp::Append { o, overlap, keys, .. } => {
                        let have = model.records[*o].len();
                        let from = have.saturating_sub(*overlap);
                        let recs = model_records(&objs[*o], &next.records[*o][from..], model.tokens[*o]);
                        let c = fx
                            .sink
                            .append(ColdBatch::single(objs[*o].clone(), tok(model.tokens[*o]), recs))
                            .await
                            .map_err(cfail)?;
                        prop_assert_eq!(c.records_written, keys.len() as u64);
                        prop_assert_eq!(c.records_skipped, (have - from) as u64);
                        prop_assert_eq!(c.snapshot.is_some(), !keys.is_empty());
                        let durable = fx.sink.watermark(&objs[*o]).await.map_err(cfail)?;
                        prop_assert_eq!(durable.through, next.records[*o].len() as u64);
                        prop_assert_eq!(c.watermarks.len(), 1);
                        prop_assert_eq!(
                            c.watermarks.get(&objs[*o]),
                            Some(&durable),
                            "the commit reports what is durable"
                        );
                        if let Some(s) = c.snapshot {
                            snap_ids.push(s);
                        }
                        // `head`: the newest snapshot and the object's watermark in it, as one
                        // answer, for the object appended to and for another one.
                        let other = &objs[(*o + 1) % objs.len()];
                        for (j, obj) in [(*o, &objs[*o]), ((*o + 1) % objs.len(), other)] {
                            let (snap, wm) = fx.sink.head(obj).await.map_err(cfail)?;
                            prop_assert_eq!(snap, snap_ids.last().copied(), "head: the newest snapshot");
                            prop_assert_eq!(wm.through, next.records[j].len() as u64, "head: the watermark");
                            prop_assert_eq!(wm, fx.sink.watermark(obj).await.map_err(cfail)?);
                        }
                    }
                    ColdOp::StaleAppend(o) => {
                        check_stale_commit(&fx, &objs, &model, *o, &stale_checked).await?;
                    }
                    ColdOp::Takeover(_) => {}
                    ColdOp::CheckAsOf(i) => {
                        if !snap_ids.is_empty() {
                            let idx = i % snap_ids.len();
                            for (j, obj) in objs.iter().enumerate() {
                                let n = model.snapshots[idx][j];
                                let want = fold_changes(&model_records(obj, &model.records[j][..n], 0)).0;
                                let at = AsOf::Snapshot(snap_ids[idx]);
                                let got = fx.sink.load_state(obj, at).await.map_err(cfail)?;
                                prop_assert_eq!(strip(&got.entries), strip(&want));
                                prop_assert_eq!(got.through, n as u64, "the snapshot's watermark");
                                prop_assert_eq!(got.snapshot, Some(snap_ids[idx]), "the snapshot read");
                                let seqs: Vec<u64> = fx
                                    .sink
                                    .read_changes(obj, 0, at)
                                    .await
                                    .map_err(cfail)?
                                    .iter()
                                    .map(|r| r.seq)
                                    .collect();
                                prop_assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>(), "changes as of the snapshot");
                            }
                        }
                    }
                }
                model = next;
            }
            // Every case ends with a stale commit on each committed object, so that the fencing
            // step never depends on the random operations bringing it up.
            for o in 0..COLD_OBJS {
                check_stale_commit(&fx, &objs, &model, o, &stale_checked).await?;
            }
            // And with a replay of each object's whole history (as a hot store recovering from
            // an unknown commit outcome sends it): all skipped, no snapshot.
            for (j, obj) in objs.iter().enumerate() {
                let n = model.records[j].len();
                if n > 0 {
                    let recs = model_records(obj, &model.records[j], model.committed[j]);
                    let c = fx
                        .sink
                        .append(ColdBatch::single(obj.clone(), tok(model.committed[j]), recs))
                        .await
                        .map_err(cfail)?;
                    prop_assert_eq!((c.records_written, c.records_skipped, c.snapshot), (0, n as u64, None));
                }
            }
            for (j, obj) in objs.iter().enumerate() {
                let wm = fx.sink.watermark(obj).await.map_err(cfail)?;
                prop_assert_eq!(wm.through, model.records[j].len() as u64);
                let got: Vec<u64> =
                    fx.sink.read_changes(obj, 0, AsOf::Latest).await.map_err(cfail)?.iter().map(|r| r.seq).collect();
                prop_assert_eq!(
                    got,
                    (1..=model.records[j].len() as u64).collect::<Vec<_>>(),
                    "records lost or doubled"
                );
                let want = fold_changes(&model_records(obj, &model.records[j], 0)).0;
                let st = fx.sink.load_state(obj, AsOf::Latest).await.map_err(cfail)?;
                prop_assert_eq!(strip(&st.entries), strip(&want));
                prop_assert_eq!(st.through, model.records[j].len() as u64, "through counts deletes too");
            }
            prop_assert_eq!(fx.sink.snapshots().await.map_err(cfail)?.len(), snap_ids.len());
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("cold sink diverged from the model: {e}");
    }
    // Each case ends with a stale commit on every object it committed to, so with more than a
    // handful of cases one is attempted (a case without any commit has well under even odds).
    if cases >= 8 {
        assert!(
            stale_checked.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "no stale commit was attempted in {} cases",
            cases.div_ceil(2)
        );
    }
}

/// Commits below the highest token object `o` was committed with, when it has one, and checks
/// that the sink refuses it as fenced; counts the attempts in `checked`.
async fn check_stale_commit(
    fx: &ColdFixture,
    objs: &[ObjectId],
    model: &ColdModel,
    o: usize,
    checked: &std::sync::atomic::AtomicU32,
) -> Result<(), TestCaseError> {
    // Stale means below the highest token a commit was made with.
    if model.committed[o] > 1 && !model.records[o].is_empty() {
        checked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let seq = model.records[o].len() as u64 + 1;
        let r = fx
            .sink
            .append(ColdBatch::single(
                objs[o].clone(),
                tok(model.committed[o] - 1),
                vec![rec(&objs[o], seq, "x", Some("x"), 1)],
            ))
            .await;
        prop_assert!(r.as_ref().is_err_and(|e| e.is_fenced()), "stale commit accepted: {:?}", r);
    }
    Ok(())
}

fn strip(entries: &[crate::Entry]) -> Vec<(String, Bytes, u64)> {
    entries.iter().map(|e| (e.key.clone(), e.value.clone(), e.seq)).collect()
}

fn cfail(e: crate::Error) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// Operations of the accelerator state machine.
#[derive(Clone, Debug)]
pub enum AccelOp {
    /// Commit new records of object `.0` (key index, put or delete each) and, in the same commit,
    /// of a second object `.2` if it is another one (the same file may then hold both).
    Commit(usize, Vec<(usize, bool)>, usize, Vec<(usize, bool)>),
    /// Check every lookup, a full scan and a scan of a key range with a limit (`.2`: first key
    /// index, end key index, limit) of object `.0` as of snapshot `.1` (modulo the number of
    /// snapshots plus one; the extra one is `AsOf::Latest`).
    Check(usize, usize, (usize, usize, usize)),
}

/// The accelerator model: every object's records and, per snapshot, how many each object had.
#[derive(Clone, Debug, Default)]
pub struct AccelModel {
    records: Vec<Vec<(u64, usize, bool)>>,
    snapshots: Vec<Vec<usize>>,
}

struct AccelMachine;

impl ReferenceStateMachine for AccelMachine {
    type State = AccelModel;
    type Transition = AccelOp;

    fn init_state() -> BoxedStrategy<AccelModel> {
        Just(AccelModel { records: vec![Vec::new(); COLD_OBJS], snapshots: Vec::new() }).boxed()
    }

    fn transitions(_: &AccelModel) -> BoxedStrategy<AccelOp> {
        prop_oneof![
            3 => (
                0..COLD_OBJS,
                proptest::collection::vec((0..COLD_KEYS, proptest::bool::weighted(0.75)), 1..6),
                0..COLD_OBJS,
                proptest::collection::vec((0..COLD_KEYS, proptest::bool::weighted(0.75)), 0..4)
            )
                .prop_map(|(o, keys, p, more)| AccelOp::Commit(o, keys, p, more)),
            2 => (0..COLD_OBJS, 0..16usize, (0..COLD_KEYS, 0..=COLD_KEYS, 1..4usize))
                .prop_map(|(o, i, r)| AccelOp::Check(o, i, r)),
        ]
        .boxed()
    }

    fn apply(mut s: AccelModel, t: &AccelOp) -> AccelModel {
        if let AccelOp::Commit(o, keys, p, more) = t {
            let second = if p != o { Some((*p, more)) } else { None };
            for (obj, keys) in std::iter::once((*o, keys)).chain(second) {
                for (k, put) in keys {
                    let seq = s.records[obj].len() as u64 + 1;
                    s.records[obj].push((seq, *k, *put));
                }
            }
            s.snapshots.push(s.records.iter().map(Vec::len).collect());
        }
        s
    }
}

/// Random sequences of commits (several objects, overwrites, deletes) interleaved with checks:
/// every lookup and every full scan, current and as of each snapshot, equals the answer of
/// folding all records of the snapshot (no false negatives, no stale versions).
pub fn prop_accelerator_matches_full_scan(f: &ColdFactory) {
    prop_accelerator_matches_full_scan_with(f, proptest_cases());
}

/// [`prop_accelerator_matches_full_scan`] with `cases` in place of [`proptest_cases`] (it runs
/// half).
pub fn prop_accelerator_matches_full_scan_with(f: &ColdFactory, cases: u32) {
    let rt = runtime();
    if !has_accel(&rt.block_on(open(f)).0, "prop_accelerator_matches_full_scan") {
        return;
    }
    let cases = cases.max(1);
    let mut runner =
        TestRunner::new(Config { cases: cases.div_ceil(2), failure_persistence: None, ..Config::default() });
    let result = runner.run(&AccelMachine::sequential_strategy(1..16), |(init, ops, _)| {
        rt.block_on(async {
            let (fx, _) = open(f).await;
            let Some(a) = fx.accel.clone() else { return Ok(()) };
            let objs: Vec<ObjectId> = (0..COLD_OBJS).map(|i| oid(&format!("x{i}"))).collect();
            let mut model = init;
            let mut snap_ids: Vec<i64> = Vec::new();
            let check = |model: &AccelModel, j: usize, as_of: AsOf, count: usize, range: (usize, usize, usize)| {
                let a = a.clone();
                let obj = objs[j].clone();
                let recs = model_records(&obj, &model.records[j][..count], 1);
                async move {
                    let want: BTreeMap<String, (Bytes, u64)> =
                        fold_changes(&recs).0.into_iter().map(|e| (e.key, (e.value, e.seq))).collect();
                    for k in 0..COLD_KEYS {
                        let key = format!("key{k}");
                        let got = a.lookup(&obj, &key, as_of).await.map_err(cfail)?.value.map(|v| (v.value, v.seq));
                        prop_assert_eq!(got, want.get(&key).cloned(), "lookup {} {} as of {:?}", obj, key, as_of);
                    }
                    let scan = a.scan(ScanQuery::object(obj.clone()).as_of(as_of)).await.map_err(cfail)?;
                    let got: BTreeMap<String, (Bytes, u64)> =
                        scan.entries.into_iter().map(|v| (v.key, (v.value, v.seq))).collect();
                    prop_assert_eq!(&got, &want, "scan {} as of {:?}", obj, as_of);
                    // A key range with a limit: the first `limit` live keys in it, in key order.
                    let (from, to, limit) = (format!("key{}", range.0), format!("key{}", range.1), range.2);
                    let mut q =
                        ScanQuery::object(obj.clone()).as_of(as_of).keys(KeyRange::between(from.clone(), to.clone()));
                    q.limit = Some(limit);
                    let got: Vec<(String, (Bytes, u64))> = a
                        .scan(q)
                        .await
                        .map_err(cfail)?
                        .entries
                        .into_iter()
                        .map(|v| (v.key, (v.value, v.seq)))
                        .collect();
                    let want: Vec<(String, (Bytes, u64))> =
                        want.into_iter().filter(|(k, _)| *k >= from && *k < to).take(limit).collect();
                    prop_assert_eq!(got, want, "scan {} of [{}, {}) limit {} as of {:?}", obj, from, to, limit, as_of);
                    Ok(())
                }
            };
            for op in &ops {
                let next = AccelMachine::apply(model.clone(), op);
                match op {
                    AccelOp::Commit(o, _, p, _) => {
                        let mut batch = ColdBatch::default();
                        for j in [*o, *p] {
                            let start = model.records[j].len();
                            if start < next.records[j].len() && batch.objects.iter().all(|c| c.object != objs[j]) {
                                let recs = model_records(&objs[j], &next.records[j][start..], 1);
                                batch.objects.push(ObjectChanges {
                                    object: objs[j].clone(),
                                    token: tok(1),
                                    records: recs,
                                });
                            }
                        }
                        let c = fx.sink.append(batch).await.map_err(cfail)?;
                        snap_ids.push(c.snapshot.expect("a non-empty commit creates a snapshot"));
                    }
                    AccelOp::Check(o, i, range) => {
                        let idx = i % (snap_ids.len() + 1);
                        if idx == snap_ids.len() {
                            check(&model, *o, AsOf::Latest, model.records[*o].len(), *range).await?;
                        } else {
                            check(&model, *o, AsOf::Snapshot(snap_ids[idx]), model.snapshots[idx][*o], *range).await?;
                        }
                    }
                }
                model = next;
            }
            for j in 0..COLD_OBJS {
                let range = (j % COLD_KEYS, (j + 3) % (COLD_KEYS + 1), 2);
                check(&model, j, AsOf::Latest, model.records[j].len(), range).await?;
                for (idx, id) in snap_ids.iter().enumerate() {
                    check(&model, j, AsOf::Snapshot(*id), model.snapshots[idx][j], range).await?;
                }
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("accelerator diverged from a full scan: {e}");
    }
}

async fn open_faulty(f: &super::ColdFaultFactory) -> super::ColdFaultFixture {
    f(ManualClock::new(KIT_EPOCH)).await
}

/// An append whose reply was lost after its commit landed: it answers `Ok` (the backend found
/// its commit) or an error a caller retries (`AmbiguousOutcome`, or retryable); sending the
/// batch again then writes nothing, and every record is stored once, in one snapshot. Also for
/// a batch of two objects.
pub async fn a_commit_whose_reply_was_lost_lands_once(f: &super::ColdFaultFactory) {
    let ff = open_faulty(f).await;
    let (fx, lose) = (&ff.fixture, &ff.lose_next_reply);
    let (o, p) = (oid("o1"), oid("o2"));
    fx.sink.append(ColdBatch::single(o.clone(), tok(1), puts(&o, 1..=3, 1))).await.expect("first append");
    let batches = [
        ColdBatch::single(o.clone(), tok(1), puts(&o, 4..=6, 1)),
        ColdBatch {
            objects: vec![
                ObjectChanges { object: o.clone(), token: tok(1), records: puts(&o, 7..=7, 1) },
                ObjectChanges { object: p.clone(), token: tok(1), records: puts(&p, 1..=2, 1) },
            ],
        },
    ];
    for (i, batch) in batches.into_iter().enumerate() {
        lose.arm();
        let first = fx.sink.append(batch.clone()).await;
        assert!(lose.fired(), "batch {i}: the backend committed it (the switch fired)");
        if let Err(e) = &first {
            assert!(e.kind() == &ErrorKind::AmbiguousOutcome || e.is_retryable(), "batch {i}: {e}");
        }
        let again = fx.sink.append(batch.clone()).await.expect("the batch sent again");
        let total: u64 = batch.objects.iter().map(|oc| oc.records.len() as u64).sum();
        assert_eq!((again.records_written, again.records_skipped), (0, total), "batch {i}: it had landed");
        assert_eq!(again.snapshot, None, "batch {i}: nothing new, no snapshot");
    }
    let seqs = |v: Vec<ChangeRecord>| v.into_iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(seqs(fx.sink.read_changes(&o, 0, AsOf::Latest).await.expect("o1")), (1..=7).collect::<Vec<_>>());
    assert_eq!(seqs(fx.sink.read_changes(&p, 0, AsOf::Latest).await.expect("o2")), [1, 2]);
    let snaps = fx.sink.snapshots().await.expect("snapshots");
    assert_eq!(snaps.iter().map(|s| s.added_records).collect::<Vec<_>>(), [3, 3, 3], "one snapshot per batch");
    assert_eq!(fx.sink.watermark(&o).await.expect("watermark").through, 7);
}

/// The token of a commit whose reply was lost is the object's: an older committer is `Fenced`
/// afterwards, and writes nothing.
pub async fn a_commit_whose_reply_was_lost_keeps_its_token(f: &super::ColdFaultFactory) {
    let ff = open_faulty(f).await;
    let (fx, lose) = (&ff.fixture, &ff.lose_next_reply);
    let o = oid("o1");
    fx.sink.append(ColdBatch::single(o.clone(), tok(1), puts(&o, 1..=2, 1))).await.expect("first append");
    lose.arm();
    let first = fx.sink.append(ColdBatch::single(o.clone(), tok(2), puts(&o, 3..=4, 2))).await;
    assert!(lose.fired(), "the backend committed it (the switch fired)");
    if let Err(e) = &first {
        assert!(e.kind() == &ErrorKind::AmbiguousOutcome || e.is_retryable(), "{e}");
    }
    let e = fx.sink.append(ColdBatch::single(o.clone(), tok(1), puts(&o, 5..=5, 1))).await.expect_err("stale");
    assert!(matches!(e.kind(), ErrorKind::Fenced { .. }), "{e}");
    let wm = fx.sink.watermark(&o).await.expect("watermark");
    assert_eq!((wm.through, wm.token), (4, tok(2)));
}

/// A commit that fails before it lands (armed with [`arm_failure`](super::LoseNextReply::arm_failure)):
/// the append answers an error a caller retries and nothing of the batch is stored, or (a
/// backend that retries by itself) `Ok` with the batch stored; never `Ok` for a batch that is
/// not there (a sink that takes a broken connection for a landed commit, or reports a watermark
/// it cached before the commit swapped in: the runtime then truncates hot storage and the
/// changes are lost). Sent again, the batch is stored once.
pub async fn a_commit_that_failed_before_landing_is_not_reported_landed(f: &super::ColdFaultFactory) {
    let ff = open_faulty(f).await;
    let (fx, switch) = (&ff.fixture, &ff.lose_next_reply);
    let o = oid("o1");
    fx.sink.append(ColdBatch::single(o.clone(), tok(1), puts(&o, 1..=3, 1))).await.expect("first append");
    if !switch.arm_failure() {
        eprintln!("SKIP a_commit_that_failed_before_landing_is_not_reported_landed: the switch cannot fail a commit");
        return;
    }
    let batch = ColdBatch::single(o.clone(), tok(1), puts(&o, 4..=6, 1));
    let first = fx.sink.append(batch.clone()).await;
    assert!(
        switch.failure_fired(),
        "the armed failure never fired: a backend's wrapper must consult the switch at its commit, before applying \
         it (ReplySwitch::take_failure; see LoseNextReply::arm_failure)"
    );
    let seqs = |v: Vec<ChangeRecord>| v.into_iter().map(|r| r.seq).collect::<Vec<_>>();
    let stored = seqs(fx.sink.read_changes(&o, 0, AsOf::Latest).await.expect("read"));
    match &first {
        Ok(c) => {
            assert_eq!(stored, (1..=6).collect::<Vec<_>>(), "answered Ok ({c:?}), so the batch is stored");
            assert_eq!(fx.sink.watermark(&o).await.expect("watermark").through, 6);
        }
        Err(e) => {
            assert!(e.kind() == &ErrorKind::AmbiguousOutcome || e.is_retryable(), "a retryable error: {e}");
            if e.kind() != &ErrorKind::AmbiguousOutcome {
                assert_eq!(stored, [1, 2, 3], "the commit failed before landing: nothing of it is stored ({e})");
                assert_eq!(fx.sink.watermark(&o).await.expect("watermark").through, 3, "{e}");
            }
        }
    }
    let again = fx.sink.append(batch).await.expect("the batch sent again");
    assert_eq!(again.records_written + again.records_skipped, 3, "{again:?}");
    assert_eq!(seqs(fx.sink.read_changes(&o, 0, AsOf::Latest).await.expect("read")), (1..=6).collect::<Vec<_>>());
    assert_eq!(fx.sink.watermark(&o).await.expect("watermark").through, 6);
}

/// Run the reply-losing cases and return the failures instead of panicking.
pub fn run_fault_cases(f: &super::ColdFaultFactory) -> Vec<CaseFailure> {
    macro_rules! cases {
        ($($c:ident),+ $(,)?) => { vec![$((stringify!($c), Box::new(|f: &super::ColdFaultFactory| runtime().block_on($c(f))) as Box<dyn Fn(&super::ColdFaultFactory)>)),+] };
    }
    let all = crate::__cold_fault_cases!([cases]());
    all.into_iter().filter_map(|(name, case)| run_catching(name, || case(f))).collect()
}

/// Run the cases that reopen a backend at a directory
/// ([`cold_reopen_conformance!`](crate::cold_reopen_conformance)) and return the failures
/// instead of panicking.
pub fn run_reopen_cases(f: &super::ColdReopenFactory) -> Vec<CaseFailure> {
    macro_rules! cases {
        ($($c:ident),+ $(,)?) => { vec![$((stringify!($c), Box::new(|f: &super::ColdReopenFactory| runtime().block_on($c(f))) as Box<dyn Fn(&super::ColdReopenFactory)>)),+] };
    }
    let all = crate::__cold_reopen_cases!([cases]());
    all.into_iter().filter_map(|(name, case)| run_catching(name, || case(f))).collect()
}

/// Run every cold case (and the property tests) and return the failures instead of panicking.
/// The accelerator cases pass for a factory with no accelerator; see
/// [`run_all_with_accelerator`].
pub fn run_all(f: &ColdFactory) -> Vec<CaseFailure> {
    run_all_with(f, proptest_cases())
}

/// [`run_all`] for a backend that has an [`IndexAccelerator`]: also fails
/// ([`the_factory_gives_its_accelerator`]) when the factory gives none, so the accelerator
/// cases cannot pass unrun.
pub fn run_all_with_accelerator(f: &ColdFactory) -> Vec<CaseFailure> {
    run_all_with_accelerator_with(f, proptest_cases())
}

/// [`run_all_with_accelerator`] with `cases` property-test cases (see [`run_all_with`]).
pub fn run_all_with_accelerator_with(f: &ColdFactory, cases: u32) -> Vec<CaseFailure> {
    let mut failures: Vec<CaseFailure> =
        run_catching("the_factory_gives_its_accelerator", || runtime().block_on(the_factory_gives_its_accelerator(f)))
            .into_iter()
            .collect();
    failures.extend(run_all_with(f, cases));
    failures
}

/// [`run_all`] with `cases` property-test cases in place of [`proptest_cases`] (a backend
/// whose every commit is slow runs fewer).
pub fn run_all_with(f: &ColdFactory, cases: u32) -> Vec<CaseFailure> {
    macro_rules! cases {
        ($($c:ident),+ $(,)?) => { vec![$((stringify!($c), Box::new(|f: &ColdFactory| runtime().block_on($c(f))) as Box<dyn Fn(&ColdFactory)>)),+] };
    }
    let all = crate::__cold_cases!([cases]());
    let mut failures: Vec<CaseFailure> =
        all.into_iter().filter_map(|(name, case)| run_catching(name, || case(f))).collect();
    failures.extend(run_catching("prop_cold_sink_matches_model", || prop_cold_sink_matches_model_with(f, cases)));
    failures.extend(run_catching("prop_accelerator_matches_full_scan", || {
        prop_accelerator_matches_full_scan_with(f, cases)
    }));
    failures
}
