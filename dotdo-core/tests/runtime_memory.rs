//! The object runtime on the reference backends with a manual clock: fencing, renewal,
//! self-fencing, flush, eviction and restore in every mode, shutdown.

#![allow(clippy::disallowed_methods)] // tests yield real time to spawned tasks

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dotdo_core::runtime::{ObjectRuntime, Recovery, RestoreMode, RuntimeSettings};
use dotdo_core::testkit::KIT_EPOCH;
use dotdo_core::*;

const TTL: Duration = Duration::from_secs(9);

struct World {
    clock: ManualClock,
    hot: MemoryBackend,
    cold: MemoryColdStore,
}

impl World {
    fn new() -> Self {
        let clock = ManualClock::new(KIT_EPOCH);
        World {
            hot: MemoryBackend::with_clock(Arc::new(clock.clone())),
            cold: MemoryColdStore::with_clock(Arc::new(clock.clone())),
            clock,
        }
    }

    fn runtime(&self, node: &str, settings: RuntimeSettings) -> ObjectRuntime {
        self.runtime_with(node, Arc::new(self.hot.clone()), Arc::new(self.cold.clone()), settings)
    }

    /// A runtime with its own hot store (a fault-injecting wrapper), the world's guard and
    /// cold store, and no accelerator.
    fn runtime_with_hot(&self, node: &str, hot: Arc<dyn HotStore>, settings: RuntimeSettings) -> ObjectRuntime {
        ObjectRuntime::builder(NodeId::new(node).expect("valid"))
            .with_hot_store(hot)
            .with_guard(Arc::new(self.hot.clone()))
            .with_cold_sink(Arc::new(self.cold.clone()))
            .with_clock(Arc::new(self.clock.clone()))
            .with_settings(settings)
            .build()
            .expect("build runtime")
    }

    /// Runtime "a" on a [`FaultyHot`] and a [`FlakyGuard`] over the world's stores.
    fn faulty_runtime(&self) -> (Arc<FaultyHot>, Arc<FlakyGuard>, ObjectRuntime) {
        let hot = Arc::new(FaultyHot::new(self.hot.clone()));
        let guard = Arc::new(FlakyGuard::new(self));
        let rt = ObjectRuntime::builder(NodeId::new("a").expect("node"))
            .with_hot_store(hot.clone())
            .with_guard(guard.clone())
            .with_cold_sink(Arc::new(self.cold.clone()))
            .with_clock(Arc::new(self.clock.clone()))
            .with_settings(settings())
            .build()
            .expect("runtime");
        (hot, guard, rt)
    }

    /// A lazily restoring runtime over the world's hot store and guard with its own cold sink
    /// (a fault-injecting wrapper); the accelerator stays the world's cold store.
    fn lazy_runtime(&self, node: &str, cold: Arc<dyn ColdSink>) -> ObjectRuntime {
        self.runtime_with(
            node,
            Arc::new(self.hot.clone()),
            cold,
            RuntimeSettings { restore: RestoreMode::Lazy, ..settings() },
        )
    }

    /// A lazily restoring runtime over the world's hot store and guard with its own cold sink
    /// and accelerator.
    fn lazy_runtime_reading(
        &self,
        node: &str,
        cold: Arc<dyn ColdSink>,
        accel: Arc<dyn dotdo_core::IndexAccelerator>,
    ) -> ObjectRuntime {
        self.runtime_restoring(node, cold, accel, RestoreMode::Lazy)
    }

    /// A runtime over the world's hot store and guard reading cold storage through `cold` and
    /// `accel`, restoring by `restore`.
    fn runtime_restoring(
        &self,
        node: &str,
        cold: Arc<dyn ColdSink>,
        accel: Arc<dyn dotdo_core::IndexAccelerator>,
        restore: RestoreMode,
    ) -> ObjectRuntime {
        ObjectRuntime::builder(NodeId::new(node).expect("valid"))
            .with_hot_store(Arc::new(self.hot.clone()))
            .with_guard(Arc::new(self.hot.clone()))
            .with_cold_sink(cold)
            .with_accelerator(accel)
            .with_clock(Arc::new(self.clock.clone()))
            .with_settings(RuntimeSettings { restore, ..settings() })
            .build()
            .expect("build runtime")
    }

    /// A lazily restoring runtime over the world's hot store and guard with its own cold sink
    /// and no accelerator.
    fn lazy_runtime_without_accelerator(&self, node: &str, cold: Arc<dyn ColdSink>) -> ObjectRuntime {
        ObjectRuntime::builder(NodeId::new(node).expect("valid"))
            .with_hot_store(Arc::new(self.hot.clone()))
            .with_guard(Arc::new(self.hot.clone()))
            .with_cold_sink(cold)
            .with_clock(Arc::new(self.clock.clone()))
            .with_settings(RuntimeSettings { restore: RestoreMode::Lazy, ..settings() })
            .build()
            .expect("build runtime")
    }

    /// The same clock and hot store over a brand-new (empty) cold store: a cold store that lost
    /// what it acknowledged, or another table.
    fn over_new_cold(&self) -> World {
        World {
            clock: self.clock.clone(),
            hot: self.hot.clone(),
            cold: MemoryColdStore::with_clock(Arc::new(self.clock.clone())),
        }
    }

    /// Runtime "a" whose guard is a [`FlakyGuard`] over the world's hot store.
    fn flaky_guard_runtime(&self, settings: RuntimeSettings) -> (Arc<FlakyGuard>, ObjectRuntime) {
        let guard = Arc::new(FlakyGuard::new(self));
        let rt = self.runtime_with("a", guard.clone(), Arc::new(self.cold.clone()), settings);
        (guard, rt)
    }

    /// A runtime "a" whose cold sink is a [`FlakyCold`] over the world's cold store.
    fn flaky_cold_runtime(&self, settings: RuntimeSettings) -> (Arc<FlakyCold>, ObjectRuntime) {
        let cold = Arc::new(FlakyCold::new(self.cold.clone()));
        let rt = self.runtime_with("a", Arc::new(self.hot.clone()), cold.clone(), settings);
        (cold, rt)
    }

    /// A runtime with its own guard and cold sink (fault-injecting wrappers); the accelerator
    /// stays the world's cold store.
    fn runtime_with(
        &self,
        node: &str,
        guard: Arc<dyn ConsistencyGuard>,
        cold: Arc<dyn ColdSink>,
        settings: RuntimeSettings,
    ) -> ObjectRuntime {
        ObjectRuntime::builder(NodeId::new(node).expect("valid"))
            .with_hot_store(Arc::new(self.hot.clone()))
            .with_guard(guard)
            .with_cold_sink(cold)
            .with_accelerator(Arc::new(self.cold.clone()))
            .with_clock(Arc::new(self.clock.clone()))
            .with_settings(settings)
            .build()
            .expect("build runtime")
    }
}

fn settings() -> RuntimeSettings {
    RuntimeSettings { lease_ttl: TTL, keep_warm: Duration::from_secs(60), ..Default::default() }
}

fn oid(s: &str) -> ObjectId {
    ObjectId::new(s).expect("valid")
}

async fn incr(rt: &ObjectRuntime, obj: &ObjectId) -> Result<u64> {
    incr_with_token(rt, obj).await.map(|(n, _)| n)
}

/// [`incr`], with the fencing token the call ran under.
async fn incr_with_token(rt: &ObjectRuntime, obj: &ObjectId) -> Result<(u64, u64)> {
    rt.invoke(obj, async |t: &mut ObjectTxn<'_>| {
        let n: u64 = t.get("n").await?.map_or(0, |b| String::from_utf8_lossy(&b).parse().unwrap_or(0));
        t.put("n", (n + 1).to_string())?;
        Ok((n + 1, t.token().get()))
    })
    .await
}

/// A world, runtime "a" and object "o" incremented once (so the runtime holds its lease).
async fn written_once() -> (World, ObjectRuntime, ObjectId) {
    let w = World::new();
    let rt = w.runtime("a", settings());
    let o = oid("o");
    incr(&rt, &o).await.expect("first");
    (w, rt, o)
}

async fn get(rt: &ObjectRuntime, obj: &ObjectId, key: &str) -> Result<Option<Bytes>> {
    let key = key.to_string();
    rt.invoke(obj, async move |t: &mut ObjectTxn<'_>| t.get(&key).await).await
}

#[tokio::test]
async fn handler_reads_its_own_writes_and_failures_write_nothing() {
    let w = World::new();
    let rt = w.runtime("a", settings());
    let o = oid("o");
    assert_eq!(incr(&rt, &o).await.expect("incr"), 1);
    assert_eq!(incr(&rt, &o).await.expect("incr"), 2);
    let r: Result<(), Error> = rt
        .invoke(&o, async |t: &mut ObjectTxn<'_>| {
            t.put("n", "999")?;
            assert_eq!(t.get("n").await?.as_deref(), Some(&b"999"[..]));
            Err(Error::invalid("handler gives up"))
        })
        .await;
    let e = r.expect_err("the handler's own error");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("handler gives up"), "the handler's error, unchanged: {e}");
    assert_eq!(get(&rt, &o, "n").await.expect("get").as_deref(), Some(&b"2"[..]));
    let bad: Result<(), Error> =
        rt.invoke(&o, async |t: &mut ObjectTxn<'_>| t.put("k", vec![0u8; MAX_VALUE_BYTES + 1])).await;
    assert!(matches!(bad.expect_err("too big").kind(), ErrorKind::LimitExceeded { .. }));
    let m = rt.metrics();
    assert_eq!((m.commits, m.activations), (2, 1));
}

/// A transaction keeps one write per key: writing a 2 MiB value 40 times (80 MiB of writes,
/// over one batch's 64 MiB) commits the last value as one change. A write that would take the
/// transaction itself past a batch's limits fails at that write, which the handler can handle,
/// and leaves the transaction as it was.
#[tokio::test]
async fn a_transaction_commits_each_keys_last_write_and_refuses_the_write_past_its_limits() {
    let w = World::new();
    let rt = w.runtime("a", settings());
    let o = oid("o");
    rt.invoke(&o, async |t: &mut ObjectTxn<'_>| {
        for i in 0..40u8 {
            t.put("blob", vec![i; MAX_VALUE_BYTES])?;
        }
        t.delete("gone")?;
        t.put("gone", "back")?;
        assert_eq!(t.pending_writes(), 2);
        Ok::<_, Error>(())
    })
    .await
    .expect("each key's last write fits one commit");
    assert_eq!(get(&rt, &o, "blob").await.expect("get").as_deref(), Some(&vec![39u8; MAX_VALUE_BYTES][..]));
    assert_eq!(get(&rt, &o, "gone").await.expect("get").as_deref(), Some(&b"back"[..]));
    let changes = w.hot.read_changes(&o, 0, 100).await.expect("changes");
    assert_eq!(changes.iter().map(|c| c.key.as_str()).collect::<Vec<_>>(), ["blob", "gone"]);

    let refused = rt
        .invoke(&o, async |t: &mut ObjectTxn<'_>| {
            for i in 0..31u32 {
                t.put(format!("k{i}"), vec![1u8; MAX_VALUE_BYTES])?;
            }
            // 31 distinct 2 MiB values and their keys: a 32nd is past 64 MiB of keys and values.
            let e = t.put("k31", vec![1u8; MAX_VALUE_BYTES]).expect_err("past the batch's bytes");
            assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
            assert_eq!(t.pending_writes(), 31);
            assert_eq!(t.get("k31").await?, None, "the refused write is not buffered");
            // Shrinking a key's value makes room again.
            t.put("k0", "small")?;
            t.put("k31", vec![1u8; MAX_VALUE_BYTES])?;
            Ok::<_, Error>(t.pending_writes())
        })
        .await
        .expect("the handler handled the refusal");
    assert_eq!(refused, 32);
    assert_eq!(get(&rt, &o, "k31").await.expect("get").map(|v| v.len()), Some(MAX_VALUE_BYTES));
}

#[tokio::test]
async fn a_second_runtime_is_refused_while_the_first_holds_and_fences_it_after_takeover() {
    let w = World::new();
    let a = w.runtime("a", settings());
    let b = w.runtime("b", settings());
    let o = oid("o");
    incr(&a, &o).await.expect("a");
    let e = incr(&b, &o).await.expect_err("held by a");
    match e.kind() {
        ErrorKind::LeaseHeld { holder, .. } => assert_eq!(holder.as_str(), "a"),
        other => panic!("expected LeaseHeld, got {other:?}"),
    }
    // a stalls past its TTL without maintenance; b takes over.
    w.clock.advance(TTL + Duration::from_millis(1));
    assert_eq!(incr(&b, &o).await.expect("b takes over"), 2);
    // a's warm lease is stale: it cannot write; it must not clobber b's state.
    let e = incr(&a, &o).await.expect_err("a is fenced out");
    assert!(matches!(e.kind(), ErrorKind::LeaseHeld { .. } | ErrorKind::Fenced { .. }), "{e}");
    assert_eq!(get(&b, &o, "n").await.expect("get").as_deref(), Some(&b"2"[..]));
}

/// A call on `o` (spawned) whose handler puts `k` = `v`, then waits for the returned signal.
fn put_until_signalled(
    rt: &ObjectRuntime,
    o: &ObjectId,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<()>>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (rt, o) = (rt.clone(), o.clone());
    let task = tokio::spawn(async move {
        rt.invoke(&o, async move |t: &mut ObjectTxn<'_>| {
            t.put("k", "v")?;
            rx.await.map_err(|_| Error::backend("signal dropped"))?;
            Ok::<_, Error>(())
        })
        .await
    });
    (tx, task)
}

/// A handler that panics after buffering a write: the panic goes on in the caller's task,
/// nothing of the call is committed, and the object's next call runs as usual (its slot is not
/// left locked); where leases go back after every call (`keep_warm` 0), the lease the panicked
/// call held is given back too, by that next call's activation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_commits_nothing_and_the_object_runs_on() {
    for keep_warm in [Duration::ZERO, Duration::from_secs(60)] {
        let w = World::new();
        let rt = w.runtime("a", RuntimeSettings { keep_warm, ..settings() });
        let o = oid("o");
        assert_eq!(incr(&rt, &o).await.expect("first"), 1);
        let panicked_token = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let panicking = {
            let (rt, o, seen) = (rt.clone(), o.clone(), panicked_token.clone());
            tokio::spawn(async move {
                rt.invoke(&o, async |t: &mut ObjectTxn<'_>| {
                    seen.store(t.token().get(), std::sync::atomic::Ordering::SeqCst);
                    t.put("n", "999")?;
                    if t.get("n").await?.is_some() {
                        panic!("the handler failed");
                    }
                    Ok::<_, Error>(())
                })
                .await
            })
        };
        assert!(panicking.await.expect_err("the handler panicked").is_panic(), "{keep_warm:?}");
        assert_eq!(w.hot.get(&o, "n").await.expect("get").as_deref(), Some(&b"1"[..]), "{keep_warm:?}");
        // The next call, and the token it runs under.
        let next = tokio::time::timeout(Duration::from_secs(60), incr_with_token(&rt, &o)).await;
        let (n, token) = next.expect("the slot is not left locked").expect("the next call");
        assert_eq!(n, 2, "{keep_warm:?}");
        let panicked = panicked_token.load(std::sync::atomic::Ordering::SeqCst);
        if keep_warm.is_zero() {
            // Not a warm reuse of the panicked call's lease: that one was given back.
            assert!(token > panicked, "keep_warm 0: the next call reused the panicked call's lease {panicked}");
        } else {
            assert_eq!(token, panicked, "kept warm: the panicked call's lease serves the next call");
        }
        assert_eq!(w.hot.get(&o, "n").await.expect("get").as_deref(), Some(&b"2"[..]), "{keep_warm:?}");
        let held = w.hot.current(&o).await.expect("current");
        assert_eq!(held.is_some(), !keep_warm.is_zero(), "{keep_warm:?}: {held:?}");
        // Another node takes the object over as it would after any call.
        if keep_warm.is_zero() {
            let b = w.runtime("b", RuntimeSettings { keep_warm, ..settings() });
            assert_eq!(incr(&b, &o).await.expect("another node"), 3);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_handler_is_kept_alive_by_renewal() {
    let w = World::new();
    let rt = w.runtime("a", settings());
    let o = oid("o");
    let (tx, task) = put_until_signalled(&rt, &o);
    // 3 TTLs pass in small steps; the runtime renews each time.
    for _ in 0..12 {
        testkit::advance_keeping_lease(&w.hot, &w.clock, &o, TTL / 4).await;
    }
    tx.send(()).expect("signal");
    task.await.expect("join").expect("handler commits after renewals");
    assert_eq!(get(&rt, &o, "k").await.expect("get").as_deref(), Some(&b"v"[..]));
    assert!(!w.hot.is_available(&o).await.expect("available"));
}

/// A read-only call whose lease ran out before it answered (the process paused between the read
/// and the answer) is refused: another node may have written since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_call_whose_lease_ran_out_is_refused_not_answered() {
    let (w, rt, o) = written_once().await;
    let clock = w.clock.clone();
    let r = rt
        .invoke(&o, async move |t: &mut ObjectTxn<'_>| {
            let v = t.get("n").await?;
            // The pause: the clock passes the lease's expiry and the handler answers at once,
            // before the renewal could run.
            clock.advance(TTL * 2);
            Ok::<_, Error>(v)
        })
        .await;
    let e = r.expect_err("the lease ran out before the answer");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    assert_eq!(rt.metrics().self_fenced, 1);
    // Meanwhile another node took the object over and wrote; the first node's next call
    // activates again and reads the new state.
    let b = w.runtime("b", settings());
    assert_eq!(incr(&b, &o).await.expect("b takes over"), 2);
    b.shutdown().await.expect("b gives the lease back");
    assert_eq!(get(&rt, &o, "n").await.expect("read again").as_deref(), Some(&b"2"[..]));
}

/// A node whose wall clock is stepped back by many TTLs still takes its lease for run out a TTL
/// after it got it: another node (whose clock did not step) takes the object over then, and the
/// first node's read-only call must not answer from its own, now stale, hot state.
#[tokio::test]
async fn a_wall_clock_stepped_back_does_not_stretch_a_lease() {
    let w = World::new();
    let stepped = Arc::new(testkit::SteppedClock::new(w.clock.clone()));
    // Node "a": its own hot store, the world's guard and cold store, the stepped clock.
    let a = ObjectRuntime::builder(NodeId::new("a").expect("node"))
        .with_hot_store(Arc::new(MemoryBackend::with_clock(stepped.clone())))
        .with_guard(Arc::new(w.hot.clone()))
        .with_cold_sink(Arc::new(w.cold.clone()))
        .with_clock(stepped.clone())
        .with_settings(settings())
        .build()
        .expect("runtime");
    let o = oid("o");
    assert_eq!(incr(&a, &o).await.expect("a writes"), 1);
    a.flush_all().await.expect("a drains to cold");
    stepped.set_back(TTL * 10);
    w.clock.advance(TTL + Duration::from_millis(1));
    // "b" (the world's hot store and clock) takes the run-out lease over and writes.
    let b = w.runtime("b", settings());
    assert_eq!(incr(&b, &o).await.expect("b takes over"), 2);
    let e = get(&a, &o, "n").await.expect_err("a's lease ran out a TTL after it got it");
    assert!(matches!(e.kind(), ErrorKind::LeaseHeld { .. } | ErrorKind::Fenced { .. }), "{e}");
}

/// A handler's lease is renewed on the monotonic clock's schedule when the wall clock steps back
/// (judged by the wall clock alone, the next renewal was many TTLs away and the guard let the
/// lease run out under the handler).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_to_the_monotonic_clock_when_the_wall_clock_steps_back() {
    let w = World::new();
    let stepped = Arc::new(testkit::SteppedClock::new(w.clock.clone()));
    let rt = ObjectRuntime::builder(NodeId::new("a").expect("node"))
        .with_hot_store(Arc::new(w.hot.clone()))
        .with_guard(Arc::new(w.hot.clone()))
        .with_cold_sink(Arc::new(w.cold.clone()))
        .with_clock(stepped.clone())
        .with_settings(settings())
        .build()
        .expect("runtime");
    let o = oid("o");
    let (tx, task) = put_until_signalled(&rt, &o);
    testkit::advance_keeping_lease(&w.hot, &w.clock, &o, TTL / 4).await;
    stepped.set_back(TTL * 10);
    for _ in 0..12 {
        testkit::advance_keeping_lease(&w.hot, &w.clock, &o, TTL / 4).await;
    }
    tx.send(()).expect("signal");
    task.await.expect("join").expect("the handler commits under its renewed lease");
    assert_eq!(get(&rt, &o, "k").await.expect("get").as_deref(), Some(&b"v"[..]));
}

/// Invalid keys to preload are refused up front: `Hybrid` keys when the runtime is built (each
/// activation failed with an accelerator; without one the key was silently ignored), a
/// prefetch's keys before it activates anything.
#[tokio::test]
async fn invalid_preload_keys_are_refused_up_front() {
    let w = World::new();
    let restore = RestoreMode::Hybrid { keys: vec!["ok".into(), String::new()], prefixes: Vec::new() };
    let e = ObjectRuntime::builder(NodeId::new("a").expect("valid"))
        .with_hot_store(Arc::new(w.hot.clone()))
        .with_guard(Arc::new(w.hot.clone()))
        .with_cold_sink(Arc::new(w.cold.clone()))
        .with_settings(RuntimeSettings { restore, ..settings() })
        .build()
        .expect_err("an empty key");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("Hybrid"), "{e}");
    let rt = w.runtime("a", settings());
    let o = oid("o");
    let e = rt.prefetch(&o, &["bad\u{0}key".into()], &[]).await.expect_err("a NUL in a key");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert_eq!(rt.metrics().activations, 0, "nothing was activated");
}

/// When the runtime's clock ran past the lease but the guard's has not, the refused read-only
/// call still gives the lease back: neither this node nor another waits out the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_read_only_call_gives_its_lease_back() {
    let w = World::new();
    let own = ManualClock::new(KIT_EPOCH);
    let rt = ObjectRuntime::builder(NodeId::new("a").expect("valid"))
        .with_hot_store(Arc::new(w.hot.clone()))
        .with_guard(Arc::new(w.hot.clone()))
        .with_cold_sink(Arc::new(w.cold.clone()))
        .with_clock(Arc::new(own.clone()))
        .with_settings(settings())
        .build()
        .expect("build runtime");
    let o = oid("o");
    incr(&rt, &o).await.expect("first");
    let clock = own.clone();
    let e = rt
        .invoke(&o, async move |t: &mut ObjectTxn<'_>| {
            let v = t.get("n").await?;
            clock.advance(TTL * 2);
            Ok::<_, Error>(v)
        })
        .await
        .expect_err("the runtime's clock passed the lease");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    assert!(w.hot.is_available(&o).await.expect("availability"), "the guard still saw the lease held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_self_fences_when_renewal_fails() {
    let w = World::new();
    let rt = w.runtime("a", settings());
    let o = oid("o");
    incr(&rt, &o).await.expect("first");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let rt2 = rt.clone();
    let o2 = o.clone();
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
    // The process "pauses" past its TTL: every jump lands past the lease's expiry, so the next
    // renewal is too late.
    let r = testkit::advance_until_finished(&w.clock, TTL * 2, task).await.expect("join");
    let e = r.expect_err("renewal failed");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    drop(tx);
    assert_eq!(rt.metrics().self_fenced, 1);
    let b = w.runtime("b", settings());
    assert_eq!(
        get(&b, &o, "n").await.expect("get").as_deref(),
        Some(&b"1"[..]),
        "nothing of the fenced handler was written"
    );
}

async fn populate(rt: &ObjectRuntime, o: &ObjectId, keys: usize) {
    rt.invoke(o, async move |t: &mut ObjectTxn<'_>| {
        for i in 0..keys {
            t.put(format!("key/{i:04}"), format!("value-{i}"))?;
        }
        t.put("gone", "x")?;
        Ok::<_, Error>(())
    })
    .await
    .expect("populate");
    rt.invoke(o, async |t: &mut ObjectTxn<'_>| t.delete("gone")).await.expect("delete");
}

async fn all_state(rt: &ObjectRuntime, o: &ObjectId) -> Vec<(String, Bytes)> {
    rt.invoke(o, async |t: &mut ObjectTxn<'_>| t.list(KeyRange::all()).await).await.expect("list")
}

#[tokio::test]
async fn eviction_and_restore_give_identical_state_in_every_mode() {
    for mode in [
        RestoreMode::Eager,
        RestoreMode::Lazy,
        RestoreMode::Hybrid { keys: vec!["key/0003".into(), "no-such-key".into()], prefixes: vec!["key/001".into()] },
    ] {
        let w = World::new();
        let rt = w.runtime("a", RuntimeSettings { restore: mode.clone(), ..settings() });
        let o = oid("o");
        populate(&rt, &o, 50).await;
        let before = all_state(&rt, &o).await;
        assert_eq!(before.len(), 50);
        rt.evict(&o).await.expect("evict");
        assert_eq!(w.hot.list(&o, KeyRange::all(), None).await.expect("hot").len(), 0, "hot state dropped");
        assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 52);
        // Another node picks it up.
        let b = w.runtime("b", RuntimeSettings { restore: mode.clone(), ..settings() });
        assert_eq!(get(&b, &o, "key/0003").await.expect("first key").as_deref(), Some(&b"value-3"[..]));
        assert_eq!(get(&b, &o, "gone").await.expect("deleted key"), None);
        let m = b.metrics();
        let last = m.recent_activations.back().expect("activation").clone();
        match mode {
            RestoreMode::Eager => assert_eq!((last.recovery, last.keys_loaded), (Recovery::Eager, 50)),
            RestoreMode::Lazy => {
                assert_eq!(last.recovery, Recovery::Lazy);
                assert!(m.lazy_cache_misses >= 2);
            }
            RestoreMode::Hybrid { .. } => {
                assert_eq!(last.recovery, Recovery::Hybrid);
                assert_eq!(m.preloaded_keys, 11, "key/0003 plus key/0010..=key/0019 (not the absent key)");
                assert_eq!(m.preload_hits, 1);
                assert_eq!(get(&b, &o, "key/0003").await.expect("again").as_deref(), Some(&b"value-3"[..]));
                assert_eq!(get(&b, &o, "no-such-key").await.expect("absent"), None);
                let m = b.metrics();
                assert_eq!(m.preload_hits, 1, "a preloaded key counts once however often it is read");
                b.prefetch(&o, &["key/0003".into()], &["key/001".into()]).await.expect("prefetch again");
                assert_eq!(b.metrics().preloaded_keys, 11, "keys preloaded already count once");
            }
            other => panic!("no test for restore mode {other:?}"),
        }
        assert_eq!(all_state(&b, &o).await, before, "{mode:?}: restored state differs");
        // Writes continue the sequence after the cold watermark.
        incr(&b, &o).await.expect("write after restore");
        b.flush(&o).await.expect("flush");
        assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 53);
    }
}

#[tokio::test]
async fn lost_hot_database_is_recovered_from_cold() {
    let w = World::new();
    let rt = w.runtime("a", settings());
    let o = oid("o");
    populate(&rt, &o, 10).await;
    rt.shutdown().await.expect("shutdown flushes");
    // A brand-new hot store (the old one is gone) over the same cold storage.
    let w2 = World {
        clock: w.clock.clone(),
        hot: MemoryBackend::with_clock(Arc::new(w.clock.clone())),
        cold: w.cold.clone(),
    };
    let rt2 = w2.runtime("b", settings());
    assert_eq!(all_state(&rt2, &o).await.len(), 10);
    incr(&rt2, &o).await.expect("write");
    rt2.flush(&o).await.expect("flush");
    let changes = w.cold.read_changes(&o, 0, AsOf::Latest).await.expect("changes");
    assert_eq!(
        changes.iter().map(|c| c.seq).collect::<Vec<_>>(),
        (1..=13).collect::<Vec<_>>(),
        "no seq reused or lost"
    );
}

#[tokio::test]
async fn flush_all_batches_objects_and_shutdown_releases_leases() {
    let w = World::new();
    let rt = w.runtime("a", settings());
    for i in 0..5 {
        incr(&rt, &oid(&format!("o{i}"))).await.expect("incr");
    }
    let r = rt.flush_all().await.expect("flush all");
    assert_eq!((r.commits, r.records, r.objects), (1, 5, 5));
    assert_eq!(rt.flush_all().await.expect("nothing left").records, 0);
    incr(&rt, &oid("o0")).await.expect("incr");
    let r = rt.shutdown().await.expect("shutdown");
    assert_eq!(r.records, 1);
    for i in 0..5 {
        assert!(w.hot.is_available(&oid(&format!("o{i}"))).await.expect("available"), "lease released");
    }
    let e = incr(&rt, &oid("o0")).await.expect_err("shut down");
    assert_eq!(e.kind(), &ErrorKind::Shutdown);
    // Nor do prefetch and flush take a lease that nothing would release any more.
    let e = rt.prefetch(&oid("o1"), &["n".to_string()], &[]).await.expect_err("prefetch after shutdown");
    assert_eq!(e.kind(), &ErrorKind::Shutdown);
    let e = rt.flush(&oid("o2")).await.expect_err("flush after shutdown");
    assert_eq!(e.kind(), &ErrorKind::Shutdown);
    let e = rt.evict(&oid("o3")).await.expect_err("evict after shutdown");
    assert_eq!(e.kind(), &ErrorKind::Shutdown);
    let e = rt.evict_idle().await.expect_err("evict_idle after shutdown (no evict_idle_after set)");
    assert_eq!(e.kind(), &ErrorKind::Shutdown);
    for i in 0..5 {
        assert!(w.hot.is_available(&oid(&format!("o{i}"))).await.expect("available"), "no lease taken");
    }
}

/// A runtime `node` whose ring holds only `owner`.
/// A ring with one node, `owner`.
fn ring_of(owner: &str) -> HashRing {
    let mut ring = HashRing::new(16).expect("ring");
    ring.add(NodeId::new(owner).expect("node"));
    ring
}

fn ring_runtime(w: &World, node: &str, owner: &str) -> ObjectRuntime {
    ring_runtime_with(w, node, ring_of(owner))
}

fn ring_runtime_with(w: &World, node: &str, ring: HashRing) -> ObjectRuntime {
    ObjectRuntime::builder(NodeId::new(node).expect("node"))
        .with_hot_store(Arc::new(w.hot.clone()))
        .with_guard(Arc::new(w.hot.clone()))
        .with_cold_sink(Arc::new(w.cold.clone()))
        .with_clock(Arc::new(w.clock.clone()))
        .with_settings(settings())
        .with_ring(ring)
        .build()
        .expect("runtime")
}

/// A ring set after build on a runtime built without one is used: for routing hints and by
/// `flush_all`, which leaves the objects the ring gives another node to that node.
#[tokio::test]
async fn a_ring_set_after_build_is_used() {
    let w = World::new();
    let rt = w.runtime("a", settings());
    let o = oid("o");
    assert_eq!(rt.owner_hint(&o), None);
    let writer = w.runtime("w", RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    incr(&writer, &o).await.expect("write, released after the call");
    rt.set_ring(ring_of("b"));
    assert_eq!(rt.owner_hint(&o).map(|n| n.to_string()), Some("b".to_string()));
    rt.flush_all().await.expect("flush_all");
    assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 0, "left to the ring's owner");
}

/// A call on `o` that puts `n` = 1 and then waits: returns once it runs, with the sender that
/// lets it finish and its task.
async fn paused_call(
    rt: &ObjectRuntime,
    o: &ObjectId,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<()>>) {
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let handler = {
        let (rt, o) = (rt.clone(), o.clone());
        tokio::spawn(async move {
            rt.invoke(&o, async |t: &mut ObjectTxn<'_>| {
                t.put("n", "1")?;
                started_tx.send(()).expect("signal");
                go_rx.await.expect("go");
                Ok::<_, Error>(())
            })
            .await
        })
    };
    started_rx.await.expect("handler running");
    (go_tx, handler)
}

/// A call on `o` that puts `n`, spawned.
fn spawn_put_n(rt: &ObjectRuntime, o: &ObjectId, n: &'static str) -> tokio::task::JoinHandle<Result<()>> {
    let (rt, o) = (rt.clone(), o.clone());
    tokio::spawn(async move {
        rt.invoke(&o, async |t: &mut ObjectTxn<'_>| {
            t.put("n", n)?;
            Ok::<_, Error>(())
        })
        .await
    })
}

/// A call on `o` whose handler waits for the returned sender, outliving `rt`'s shutdown (which
/// returns, reporting it busy, while the test's clock ticks).
async fn call_outliving_shutdown(
    w: &World,
    rt: &ObjectRuntime,
    o: &ObjectId,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<()>>) {
    let (go_tx, handler) = paused_call(rt, o).await;
    let ticking = tick(w);
    let report = rt.shutdown().await.expect("shutdown");
    ticking.abort();
    assert_eq!(report.busy, 1, "{report:?}");
    (go_tx, handler)
}

/// `flush_all` and `shutdown` also drain the changes of objects no runtime holds any more:
/// released after each call (`keep_warm` 0), released idle by `maintain`. Each is taken, drained
/// and given back. An object another node holds, or that the ring gives another node, is left
/// to that node.
#[tokio::test]
async fn flush_all_drains_pending_changes_of_objects_no_longer_held() {
    let w = World::new();
    let a = w.runtime("a", RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    incr(&a, &oid("released")).await.expect("incr");
    assert_eq!(w.hot.current(&oid("released")).await.expect("current"), None, "released after the call");
    let b = w.runtime("b", RuntimeSettings { keep_warm: Duration::from_secs(5), ..settings() });
    incr(&b, &oid("idle")).await.expect("incr");
    w.clock.advance(Duration::from_secs(6));
    b.maintain().await.expect("maintain");
    assert_eq!(w.hot.current(&oid("idle")).await.expect("current"), None, "released idle");
    let c = w.runtime("c", settings());
    incr(&c, &oid("theirs")).await.expect("incr");

    // A runtime whose ring gives every object to another node drains nothing.
    let d = ring_runtime(&w, "d", "z");
    assert_eq!(d.flush_all().await.expect("flush").records, 0, "the ring's owner drains them");

    let r = a.flush_all().await.expect("flush all");
    assert_eq!((r.commits, r.records, r.objects), (1, 2, 2), "{r:?}");
    for o in ["released", "idle"] {
        assert_eq!(w.cold.watermark(&oid(o)).await.expect("wm").through, 1, "{o} drained");
        assert_eq!(w.hot.current(&oid(o)).await.expect("current"), None, "{o} given back");
    }
    assert_eq!(w.cold.watermark(&oid("theirs")).await.expect("wm").through, 0, "left to the node holding it");
    assert_eq!(w.hot.objects_with_pending_changes(None, 10).await.expect("pending"), [oid("theirs")]);

    // Shutdown drains the same way; nothing is left once the holder has gone too.
    assert_eq!(incr(&a, &oid("released")).await.expect("incr"), 2);
    let r = b.shutdown().await.expect("shutdown");
    assert_eq!((r.records, r.objects), (1, 1), "{r:?}");
    c.shutdown().await.expect("shutdown");
    assert!(w.hot.objects_with_pending_changes(None, 10).await.expect("pending").is_empty());
    assert_eq!(w.cold.watermark(&oid("released")).await.expect("wm").through, 2);
    assert_eq!(w.cold.watermark(&oid("theirs")).await.expect("wm").through, 1);
}

/// A `flush_all` dropped by its caller while it drains an object it took only for the flush
/// (a host's timeout around it, a cold commit that hangs) does not keep that object warm: the
/// next `maintain` gives the lease back. Before, the object stayed active for `keep_warm`,
/// renewed, and its owner's calls got `LeaseHeld`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_flush_all_gives_back_the_objects_it_took() {
    let w = World::new();
    let writer = w.runtime("w", RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    let o = oid("o");
    incr(&writer, &o).await.expect("a change left pending, its lease released");
    assert_eq!(w.hot.current(&o).await.expect("current"), None);
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    let a = flaky_runtime(&w, cold.clone());
    *cold.before_append.lock() = Some(Box::pin(futures::future::pending()));
    tokio::time::timeout(Duration::from_millis(50), a.flush_all()).await.expect_err("the cold commit hangs");
    a.maintain().await.expect("maintain");
    assert_eq!(w.hot.current(&o).await.expect("current"), None, "given back");
    assert_eq!(incr(&writer, &o).await.expect("its owner's next call"), 2);
}

/// A call that outlives shutdown's wait keeps its lease while it runs (renewed), commits, and
/// gives the lease back when it ends; its change is drained by the next `flush_all`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_outliving_shutdown_gives_its_lease_back_when_it_ends() {
    let w = World::new();
    let rt = w.runtime("a", settings());
    let o = oid("o");
    let (go_tx, handler) = call_outliving_shutdown(&w, &rt, &o).await;
    assert!(w.hot.current(&o).await.expect("current").is_some(), "held while the call runs");
    go_tx.send(()).expect("go");
    tokio::time::timeout(Duration::from_secs(10), handler).await.expect("finished").expect("join").expect("call");
    assert_eq!(w.hot.current(&o).await.expect("current"), None, "given back when the call ended");
    let next = w.runtime("b", settings());
    assert_eq!(next.flush_all().await.expect("flush").records, 1, "its change is drained by the next flush_all");
    assert_eq!(get(&next, &o, "n").await.expect("get"), Some(Bytes::from("1")));
}

/// A call admitted before shutdown that waits on its object's slot behind a call outliving
/// shutdown does not activate the object anew once shutdown has given the leases back: it is
/// `Shutdown`, and takes no lease. Before, it acquired a fresh lease (and could restore from
/// cold) after shutdown had returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_queued_behind_a_busy_slot_does_not_activate_after_shutdown() {
    let w = World::new();
    let rt = w.runtime("a", settings());
    let o = oid("o");
    let (go_tx, handler) = paused_call(&rt, &o).await;
    let admitted = rt.metrics().invokes;
    let queued = spawn_put_n(&rt, &o, "2");
    // Admitted before shutdown (counted past the shutdown check, then waiting for the slot).
    until("the queued call is admitted", || async { rt.metrics().invokes > admitted }).await;
    let ticking = tick(&w);
    let report = rt.shutdown().await.expect("shutdown");
    ticking.abort();
    assert_eq!(report.busy, 1, "{report:?}");
    go_tx.send(()).expect("go");
    tokio::time::timeout(Duration::from_secs(10), handler).await.expect("finished").expect("join").expect("call");
    let e = tokio::time::timeout(Duration::from_secs(10), queued).await.expect("finished").expect("join");
    let e = e.expect_err("the queued call does not run after shutdown");
    assert_eq!(e.kind(), &ErrorKind::Shutdown, "{e}");
    assert_eq!(w.hot.current(&o).await.expect("current"), None, "no lease taken");
    assert_eq!(w.hot.get(&o, "n").await.expect("get"), Some(Bytes::from("1")));
}

/// `flush` and `evict` of an object already evicted do nothing: no activation, whose eager
/// restore would bring the whole state back into hot storage.
#[tokio::test]
async fn flush_or_evict_of_an_evicted_object_leaves_it_in_cold() {
    let w = World::new();
    let rt = w.runtime("a", settings());
    let o = oid("o");
    populate(&rt, &o, 20).await;
    rt.evict(&o).await.expect("evict");
    let activations = rt.metrics().activations;
    assert_eq!(rt.flush(&o).await.expect("flush"), Default::default());
    rt.evict(&o).await.expect("evict again");
    assert_eq!(rt.metrics().activations, activations, "not activated");
    assert_eq!(w.hot.object_info(&o).await.expect("info").map_or(0, |i| i.keys), 0, "still out of hot storage");
    assert_eq!(w.hot.current(&o).await.expect("current"), None, "no lease taken");
    assert_eq!(all_state(&rt, &o).await.len(), 20, "and it comes back on the next call");
}

/// An evicted object whose cold storage no longer holds what it acknowledged (a new cold
/// store, another table) is refused as `Corrupt`, never activated empty.
#[tokio::test]
async fn an_evicted_object_whose_cold_lost_its_changes_is_corrupt_not_empty() {
    let w = World::new();
    let rt = w.runtime("a", settings());
    let o = oid("o");
    populate(&rt, &o, 5).await;
    rt.evict(&o).await.expect("evict");
    rt.shutdown().await.expect("shutdown");
    let w2 = w.over_new_cold();
    let rt2 = w2.runtime("b", settings());
    let err = get(&rt2, &o, "key/0000").await.expect_err("not served empty");
    assert!(matches!(err.kind(), ErrorKind::Corrupt), "{err}");
    assert!(err.to_string().contains("through seq 7"), "{err}");
    assert_eq!(w.hot.object_info(&o).await.expect("info").map_or(0, |i| i.last_seq), 7, "nothing written");
    // The object is still served from the cold store that has it.
    let rt3 = w.runtime("c", settings());
    assert_eq!(all_state(&rt3, &o).await.len(), 5);
}

/// An object drained to a cold store that has since lost its changes is not evicted: its hot
/// state is the only copy (`Corrupt`, nothing dropped, still served from hot).
#[tokio::test]
async fn an_object_whose_cold_lost_its_changes_is_not_evicted() {
    let w = World::new();
    let rt = w.runtime("a", settings());
    let o = oid("o");
    populate(&rt, &o, 5).await;
    rt.flush(&o).await.expect("flush");
    rt.shutdown().await.expect("shutdown");
    let w2 = w.over_new_cold();
    let rt2 = w2.runtime("b", settings());
    let err = rt2.evict(&o).await.expect_err("the only copy is kept");
    assert!(matches!(err.kind(), ErrorKind::Corrupt), "{err}");
    assert!(err.to_string().contains("through seq 7"), "{err}");
    assert_eq!(w.hot.object_info(&o).await.expect("info").expect("kept").keys, 5, "nothing dropped");
    assert_eq!(all_state(&rt2, &o).await.len(), 5, "still served from hot");
    rt2.shutdown().await.expect("shutdown");
    let rt3 = w.runtime("c", settings());
    get(&rt3, &o, "key/0000").await.expect("served");
    rt3.evict(&o).await.expect("the cold store that has the changes allows the eviction");
    assert_eq!(w.hot.object_info(&o).await.expect("info").map_or(0, |i| i.keys), 0);
}

/// A failure to list the objects nobody holds does not keep `flush_all` from draining the held
/// ones (it is reported at the end); with `drain_released` off, released objects are left alone.
#[tokio::test]
async fn held_objects_are_drained_when_the_released_ones_cannot_be_listed() {
    let w = World::new();
    let hot = Arc::new(FaultyHot::new(w.hot.clone()));
    let rt = w.runtime_with_hot("a", hot.clone(), settings());
    incr(&rt, &oid("held")).await.expect("incr");
    hot.fail_listing.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = rt.flush_all().await.expect_err("the listing failure is reported");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert_eq!(w.cold.watermark(&oid("held")).await.expect("wm").through, 1, "the held object was drained");

    let quiet = w.runtime("q", RuntimeSettings { drain_released: false, keep_warm: Duration::ZERO, ..settings() });
    incr(&quiet, &oid("released")).await.expect("incr");
    assert_eq!(quiet.flush_all().await.expect("flush").records, 0, "released objects are left alone");
    assert_eq!(w.cold.watermark(&oid("released")).await.expect("wm").through, 0);
}

/// An object whose changes span several commits of one `flush_all` counts once.
#[tokio::test]
async fn flush_all_counts_each_object_once_across_commits() {
    let w = World::new();
    let rt = w.runtime("a", RuntimeSettings { flush_batch_records: 2, ..settings() });
    for _ in 0..3 {
        incr(&rt, &oid("o0")).await.expect("incr");
    }
    incr(&rt, &oid("o1")).await.expect("incr");
    let r = rt.flush_all().await.expect("flush all");
    assert_eq!((r.commits, r.records, r.objects), (2, 4, 2), "{r:?}");
}

/// A flush's cold commits hold at most `flush_batch_bytes` (one record alone if it is larger):
/// values go up to 2 MiB, and a record count alone let a long backlog into one commit (a
/// 100 000-record budget: about 200 GB in memory).
#[tokio::test]
async fn flush_commits_are_bounded_in_bytes() {
    for flush_all in [false, true] {
        let w = World::new();
        let rt = w.runtime("a", RuntimeSettings { flush_batch_bytes: 1 << 20, ..settings() });
        let put = async |o: &'static str, key: String, value: Vec<u8>| {
            rt.invoke(&oid(o), async move |t: &mut ObjectTxn<'_>| t.put(key, value)).await
        };
        for o in ["o0", "o1"] {
            for i in 0..5u8 {
                put(o, format!("k{i}"), vec![i; 300 << 10]).await.expect("put");
            }
        }
        put("o1", "big".into(), vec![9; 1536 << 10]).await.expect("a record over the budget alone");
        let (commits, records) = if flush_all {
            let r = rt.flush_all().await.expect("flush all");
            (r.commits, r.records)
        } else {
            let (a, b) = (rt.flush(&oid("o0")).await.expect("flush"), rt.flush(&oid("o1")).await.expect("flush"));
            (a.commits + b.commits, a.records + b.records)
        };
        // Three 300 KiB records fit in 1 MiB, four do not; the 1.5 MiB record goes alone.
        assert_eq!((commits, records), (5, 11), "flush_all: {flush_all}");
        assert_eq!(w.cold.watermark(&oid("o0")).await.expect("wm").through, 5);
        assert_eq!(w.cold.watermark(&oid("o1")).await.expect("wm").through, 6);
        let big = get(&rt, &oid("o1"), "big").await.expect("get").expect("the big value");
        assert_eq!(big.len(), 1536 << 10);
    }
}

#[tokio::test]
async fn idle_objects_are_tiered_out_and_come_back() {
    let w = World::new();
    let rt = w.runtime("a", RuntimeSettings { evict_idle_after: Some(Duration::from_secs(5)), ..settings() });
    incr(&rt, &oid("idle")).await.expect("incr");
    w.clock.advance(Duration::from_secs(3));
    incr(&rt, &oid("busy")).await.expect("incr");
    w.clock.advance(Duration::from_secs(3));
    assert_eq!(rt.evict_idle().await.expect("evict idle"), 1);
    assert!(w.hot.get(&oid("idle"), "n").await.expect("hot").is_none(), "idle object left hot storage");
    assert!(w.hot.get(&oid("busy"), "n").await.expect("hot").is_some());
    assert_eq!(incr(&rt, &oid("idle")).await.expect("comes back"), 2);
}

/// An idle activation whose lease lapsed (no `maintain` renewed it) and that another node took
/// meanwhile is dropped by `evict_idle`, not taken back to be evicted: it failed `LeaseHeld`
/// every round (with `acquire_timeout` set, after waiting it out), and the other node's object
/// stayed in this node's activations.
#[tokio::test]
async fn evict_idle_leaves_an_object_another_node_took_over() {
    let w = World::new();
    let a = w.runtime("a", RuntimeSettings { evict_idle_after: Some(Duration::from_secs(5)), ..settings() });
    let o = oid("o");
    incr(&a, &o).await.expect("a");
    w.clock.advance(TTL * 2 + Duration::from_secs(5));
    let b = w.runtime("b", settings());
    assert_eq!(incr(&b, &o).await.expect("b takes the lapsed object"), 2);
    assert_eq!(a.evict_idle().await.expect("nothing of a's to evict"), 0);
    assert_eq!(w.hot.current(&o).await.expect("current").expect("b's lease").holder.as_str(), "b");
    assert_eq!(w.hot.get(&o, "n").await.expect("hot").as_deref(), Some(&b"2"[..]), "b's state stays in hot storage");
    assert_eq!(a.evict_idle().await.expect("and a does not try again"), 0);
}

/// An idle activation whose lease lapsed here while another node took the object, drained and
/// evicted it, and let it go: `evict_idle` takes the lease again, finds the object out of hot
/// storage already and leaves it (it restored the object's whole state from cold storage into
/// hot storage, only to drain nothing and evict it again); likewise `evict`.
#[tokio::test]
async fn evicting_an_object_another_node_evicted_meanwhile_restores_nothing() {
    let w = World::new();
    let b = w.runtime("b", RuntimeSettings { evict_idle_after: Some(Duration::from_secs(5)), ..settings() });
    let c = w.runtime("c", settings());
    let (o, p) = (oid("o"), oid("p"));
    incr(&b, &o).await.expect("b");
    incr(&c, &p).await.expect("c");
    w.clock.advance(TTL * 2 + Duration::from_secs(5));
    let a = w.runtime("a", settings());
    for x in [&o, &p] {
        assert_eq!(incr(&a, x).await.expect("a takes the lapsed object"), 2);
        a.evict(x).await.expect("a evicts it");
        assert!(w.hot.object_info(x).await.expect("info").is_some_and(|i| i.keys == 0), "out of hot storage");
    }
    let (b0, c0) = (b.metrics(), c.metrics());
    assert_eq!(b.evict_idle().await.expect("evict idle"), 0, "nothing of b's evicted");
    c.evict(&p).await.expect("evict");
    for (before, after) in [(b0, b.metrics()), (c0, c.metrics())] {
        assert_eq!(after.eager_restores, before.eager_restores, "nothing restored to be evicted again");
        assert_eq!(after.activations, before.activations);
        assert_eq!(after.evictions, before.evictions);
    }
    for x in [&o, &p] {
        assert!(w.hot.object_info(x).await.expect("info").is_some_and(|i| i.keys == 0), "still out of hot storage");
        assert!(w.hot.current(x).await.expect("current").is_none(), "no lease left behind");
        assert_eq!(incr(&a, x).await.expect("comes back"), 3);
    }
}

#[tokio::test]
async fn auto_flush_after_threshold_and_release_without_keep_warm() {
    let w = World::new();
    let rt = w.runtime("a", RuntimeSettings { flush_after_changes: 3, keep_warm: Duration::ZERO, ..settings() });
    let o = oid("o");
    for _ in 0..3 {
        incr(&rt, &o).await.expect("incr");
        assert!(w.hot.is_available(&o).await.expect("available"), "released after each call");
    }
    assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 3);
    assert_eq!(rt.metrics().activations, 3);
}

/// With `flush_after_changes`, a write does not read the object's info (a pass over its keys in
/// the SQL stores: ~20 ms per put into an object of 100k keys) until its pending changes may
/// have reached the threshold; the flushes still come at the threshold.
#[tokio::test]
async fn the_auto_flush_check_reads_the_objects_info_only_near_the_threshold() {
    let w = World::new();
    let hot = Arc::new(FaultyHot::new(w.hot.clone()));
    let rt = w.runtime_with_hot("a", hot.clone(), RuntimeSettings { flush_after_changes: 10, ..settings() });
    let o = oid("o");
    incr(&rt, &o).await.expect("activates");
    let reads = || hot.info_reads.load(std::sync::atomic::Ordering::SeqCst);
    let before = reads();
    for n in 2..=26 {
        assert_eq!(incr(&rt, &o).await.expect("incr"), n);
        let flushed = w.cold.watermark(&o).await.expect("wm").through;
        assert_eq!(flushed, n / 10 * 10, "after {n} changes");
    }
    // Two checks and a drain per ten writes (at 10 and 20: a drain reads the info too, and the
    // next write's check reads it again), not one read per write.
    let read = reads() - before;
    assert!(read <= 10, "{read} object_info reads for 25 writes");
}

#[test]
fn builder_requires_components_and_valid_settings() {
    let w = World::new();
    let e = ObjectRuntime::builder(NodeId::new("a").expect("valid")).build().expect_err("no components");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    // A build with every component and `settings`, refused.
    let refused = |settings: RuntimeSettings, why: &str| {
        ObjectRuntime::builder(NodeId::new("a").expect("valid"))
            .with_hot_store(Arc::new(w.hot.clone()))
            .with_guard(Arc::new(w.hot.clone()))
            .with_cold_sink(Arc::new(w.cold.clone()))
            .with_settings(settings)
            .build()
            .expect_err(why)
    };
    let e = refused(RuntimeSettings { lease_ttl: Duration::ZERO, ..Default::default() }, "zero ttl");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    let e = refused(
        RuntimeSettings {
            keep_warm: Duration::from_secs(30),
            evict_idle_after: Some(Duration::from_secs(60)),
            ..Default::default()
        },
        "eviction after the lease is released can never happen",
    );
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    // Nor with every lease given back after its call (accepted, it never evicted anything).
    let e = refused(
        RuntimeSettings { keep_warm: Duration::ZERO, evict_idle_after: Some(Duration::ZERO), ..Default::default() },
        "nothing stays held to be evicted",
    );
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    assert!(e.to_string().contains("keep_warm above zero"), "{e}");
    // An automatic flush with no time at all would be abandoned at once, every time.
    let e = refused(
        RuntimeSettings { auto_flush_timeout: Duration::ZERO, ..Default::default() },
        "zero auto_flush_timeout",
    );
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    assert!(e.to_string().contains("auto_flush_timeout"), "{e}");
}

/// `maintain` tiers out objects idle for `evict_idle_after` even when that equals `keep_warm`
/// (it used to release their leases first, after which nothing was ever evicted).
#[tokio::test]
async fn maintain_evicts_idle_objects_before_releasing_them() {
    let w = World::new();
    let idle = Duration::from_secs(5);
    let rt = w.runtime("a", RuntimeSettings { keep_warm: idle, evict_idle_after: Some(idle), ..settings() });
    let o = oid("o");
    incr(&rt, &o).await.expect("incr");
    w.clock.advance(idle + Duration::from_secs(1));
    rt.maintain().await.expect("maintain");
    assert_eq!(rt.metrics().evictions, 1);
    assert!(w.hot.get(&o, "n").await.expect("hot").is_none(), "left hot storage");
    assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 1, "drained to cold first");
    assert_eq!(incr(&rt, &o).await.expect("comes back"), 2);
}

/// An idle object whose activation is lazy (its state read from cold storage, nothing of it in
/// hot storage) is tiered out without reading cold storage: nothing in hot depends on it. The
/// eviction needed cold storage reachable; while cold was down, the object's lease was kept
/// (renewed past `keep_warm`) for the next attempt.
#[tokio::test]
async fn an_idle_lazy_activation_with_nothing_in_hot_is_tiered_out_with_cold_down() {
    let w = World::new();
    let idle = Duration::from_secs(5);
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    let settings =
        RuntimeSettings { restore: RestoreMode::Lazy, keep_warm: idle, evict_idle_after: Some(idle), ..settings() };
    let rt = w.runtime_with("a", Arc::new(w.hot.clone()), cold.clone(), settings);
    let o = oid("o");
    incr(&rt, &o).await.expect("incr");
    rt.evict(&o).await.expect("evict");
    assert_eq!(rt.metrics().evictions, 1);
    assert_eq!(get(&rt, &o, "n").await.expect("a lazy read"), Some(Bytes::from("1")));
    assert!(w.hot.get(&o, "n").await.expect("hot").is_none(), "nothing restored to hot storage");
    assert!(!w.hot.is_available(&o).await.expect("available"), "held, warm");
    w.clock.advance(idle + Duration::from_secs(1));
    cold.down.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(rt.evict_idle().await.expect("tiered out"), 1);
    assert_eq!(rt.metrics().evictions, 2);
    assert!(w.hot.is_available(&o).await.expect("available"), "its lease given back");
    cold.down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(incr(&rt, &o).await.expect("comes back"), 2);
}

/// A long idle-eviction pass (each eviction a cold commit, here 4 s of a 9 s TTL) renews the
/// other objects' leases as they fall due: a warm object's lease ran out during the pass, and
/// the round gave the object back (its next call a cold start, another node free to take it).
#[tokio::test]
async fn a_long_eviction_pass_keeps_the_warm_objects_leases() {
    let w = World::new();
    let idle = Duration::from_secs(13);
    let (cold, rt) = w.flaky_cold_runtime(RuntimeSettings { evict_idle_after: Some(idle), ..settings() });
    let idle_ones = [oid("a0"), oid("a1"), oid("a2")];
    for o in &idle_ones {
        incr(&rt, o).await.expect("incr");
    }
    w.clock.advance(idle + Duration::from_secs(1));
    let warm = oid("w");
    incr(&rt, &warm).await.expect("incr");
    let clock = w.clock.clone();
    *cold.each_append.lock() = Some(Arc::new(move || clock.advance(Duration::from_secs(4))));
    rt.maintain().await.expect("maintain");
    assert_eq!(rt.metrics().evictions, 3, "the idle ones tiered out");
    for o in &idle_ones {
        assert!(w.hot.get(o, "n").await.expect("hot").is_none(), "{o} left hot storage");
    }
    assert!(!w.hot.is_available(&warm).await.expect("available"), "the warm object is still held");
    let activations = rt.metrics().activations;
    assert_eq!(incr(&rt, &warm).await.expect("warm"), 2);
    assert_eq!(rt.metrics().activations, activations, "a warm call, no cold start");
}

/// An idle eviction that fails for a passing reason (cold unreachable) is tried again by the
/// next `maintain`: the object stays held (renewed) past `keep_warm` meanwhile. Released in the
/// round its eviction failed, it was never this runtime's to evict again, and its hot state
/// stayed until someone used the object.
#[tokio::test]
async fn a_failed_idle_eviction_is_tried_again_by_the_next_round() {
    // Cold unreachable (`Unavailable`), then a cold commit whose outcome stays unknown
    // (`AmbiguousOutcome` after the drain's own attempts): both pass.
    for ambiguous in [false, true] {
        let w = World::new();
        let idle = Duration::from_secs(5);
        let (cold, rt) =
            w.flaky_cold_runtime(RuntimeSettings { keep_warm: idle, evict_idle_after: Some(idle), ..settings() });
        let o = oid("o");
        incr(&rt, &o).await.expect("incr");
        w.clock.advance(idle + Duration::from_secs(1));
        let fail = |on: bool| {
            if ambiguous {
                cold.ambiguous_appends.store(if on { 100 } else { 0 }, std::sync::atomic::Ordering::SeqCst);
            } else {
                cold.down.store(on, std::sync::atomic::Ordering::SeqCst);
            }
        };
        fail(true);
        // (The clock ticks during each round: the drain's retries wait on it.)
        let maintain = async || {
            let ticking = tick(&w);
            let out = rt.maintain().await;
            ticking.abort();
            out
        };
        assert!(maintain().await.is_err(), "the eviction failed ({ambiguous})");
        assert!(!w.hot.is_available(&o).await.expect("available"), "still held, for the next try");
        // Two more rounds, further apart than a TTL in all: kept renewed meanwhile.
        w.clock.advance(TTL / 2 + Duration::from_secs(1));
        assert!(maintain().await.is_err(), "cold still failing");
        assert!(!w.hot.is_available(&o).await.expect("available"), "still held");
        fail(false);
        w.clock.advance(TTL / 2 + Duration::from_secs(1));
        maintain().await.expect("maintain");
        assert_eq!(rt.metrics().evictions, 1);
        assert!(w.hot.get(&o, "n").await.expect("hot").is_none(), "left hot storage");
        assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 1, "drained to cold first");
        assert!(w.hot.is_available(&o).await.expect("available"), "and released");
    }
}

/// An idle eviction the hot store refuses as busy (`Unavailable`: nothing dropped) keeps the
/// object held and is tried again by the next round. It was released as if its state might be
/// gone, and nothing evicted it again: it stayed in hot storage until someone used it.
#[tokio::test]
async fn an_idle_eviction_the_hot_store_refuses_busy_is_tried_again() {
    let w = World::new();
    let hot = Arc::new(FaultyHot::new(w.hot.clone()));
    hot.honest_evicts.store(true, std::sync::atomic::Ordering::SeqCst);
    let idle = Duration::from_secs(5);
    let rt = w.runtime_with_hot(
        "a",
        hot.clone(),
        RuntimeSettings { keep_warm: idle, evict_idle_after: Some(idle), ..settings() },
    );
    let o = oid("o");
    incr(&rt, &o).await.expect("incr");
    w.clock.advance(idle + Duration::from_secs(1));
    hot.busy_evicts.store(1, std::sync::atomic::Ordering::SeqCst);
    let e = rt.maintain().await.expect_err("the hot store was busy");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(!w.hot.is_available(&o).await.expect("available"), "still held, for the next try");
    assert_eq!(w.hot.get(&o, "n").await.expect("hot").as_deref(), Some(&b"1"[..]), "nothing dropped");
    w.clock.advance(Duration::from_secs(1));
    rt.maintain().await.expect("maintain");
    assert_eq!(rt.metrics().evictions, 1);
    assert!(w.hot.get(&o, "n").await.expect("hot").is_none(), "left hot storage");
    assert!(w.hot.is_available(&o).await.expect("available"), "and released");
    assert_eq!(incr(&rt, &o).await.expect("restored from cold"), 2);
}

#[test]
fn invoke_futures_are_send_so_hosts_can_spawn_them() {
    fn assert_send<T: Send>(_: &T) {}
    let w = World::new();
    let rt = w.runtime("a", settings());
    let o = oid("o");
    let fut = rt.invoke(&o, async |t: &mut ObjectTxn<'_>| {
        let v = t.get("k").await?;
        t.put("k", v.unwrap_or_default())
    });
    assert_send(&fut);
}

/// The README's maintenance task compiles and runs as written: a clone of the runtime moved into
/// a spawned task running `run_maintenance`, which ends once `shutdown` has begun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_maintenance_can_be_spawned_and_ends_at_shutdown() {
    let w = World::new();
    let rt = w.runtime("a", RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    let o = oid("o");
    incr(&rt, &o).await.expect("incr");
    let m = rt.clone();
    let task = tokio::spawn(async move { m.run_maintenance(Duration::from_millis(1)).await });
    rt.shutdown().await.expect("shutdown");
    // The task's sleeps are on the manual clock: keep it moving until the task sees the shutdown.
    dotdo_core::testkit::advance_until_finished(&w.clock, Duration::from_millis(1), task)
        .await
        .expect("the maintenance task ends");
}

/// `run_maintenance` with a long period ends within `MAINTENANCE_WAKE` of shutdown: it slept
/// out its whole period first (an hour here), and a host awaiting it after `shutdown` waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_maintenance_with_a_long_period_ends_soon_after_shutdown() {
    let w = World::new();
    let rt = w.runtime("a", settings());
    let m = rt.clone();
    let task = tokio::spawn(async move { m.run_maintenance(Duration::from_secs(3600)).await });
    // Asleep in its first period.
    until("the task sleeps", || async { w.clock.pending_sleeps() > 0 }).await;
    assert!(!task.is_finished());
    rt.shutdown().await.expect("shutdown");
    // One wake's worth of clock time, and no more: the task ends (it slept out its hour).
    w.clock.advance(dotdo_core::runtime::MAINTENANCE_WAKE);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the maintenance task ends within one wake of shutdown")
        .expect("join");
}

/// A maintenance round that evicts idle objects counts as one call in progress (`in_flight`
/// 1, not 2: the round's eviction entered again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maintenance_round_evicting_counts_once_in_flight() {
    let w = World::new();
    let (cold, rt) =
        w.flaky_cold_runtime(RuntimeSettings { evict_idle_after: Some(Duration::from_secs(1)), ..settings() });
    let o = oid("o");
    incr(&rt, &o).await.expect("incr");
    rt.flush(&o).await.expect("flush");
    w.clock.advance(Duration::from_secs(2));
    // The eviction checks that cold holds the object's changes: its watermark read hangs (for
    // good, once entered).
    cold.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let round = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.maintain().await })
    };
    until("the round is in progress", || async { rt.metrics().in_flight > 0 }).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(rt.metrics().in_flight, 1, "one round, one call in progress");
    // (The hung read never ends: the round is dropped, and counted out.)
    round.abort();
    assert!(round.await.expect_err("aborted").is_cancelled());
    assert_eq!(rt.metrics().in_flight, 0);
}

/// A call that waits for another node's lease while shutdown runs does not activate the object
/// once shutdown has returned: no lease, no restore, no handler (it took the lease when the
/// other node's expired, and ran and committed after shutdown said it was done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_for_another_nodes_lease_does_not_activate_after_shutdown() {
    let w = World::new();
    let rt = w.runtime("a", RuntimeSettings { acquire_timeout: TTL * 4, ..settings() });
    let o = oid("o");
    let b = w.hot.acquire(&o, &NodeId::new("b").expect("valid"), TTL * 2).await.expect("b holds o");
    let waiting = spawn_put_n(&rt, &o, "2");
    until("the call is admitted", || async { rt.metrics().invokes == 1 }).await;
    let ticking = tick(&w);
    let report = rt.shutdown().await.expect("shutdown");
    assert_eq!(report.busy, 1, "{report:?}");
    let e = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("finished").expect("join");
    ticking.abort();
    let e = e.expect_err("no activation after shutdown");
    assert_eq!(e.kind(), &ErrorKind::Shutdown, "{e}");
    assert_eq!(w.hot.get(&o, "n").await.expect("get"), None, "the handler never ran");
    let now = w.hot.current(&o).await.expect("current");
    assert!(now.as_ref().is_none_or(|l| l.token == b.token), "no lease taken by a: {now:?}");
}

/// A call cancelled after shutdown has returned (it outlived shutdown's wait) leaves its lease
/// as an orphan: `maintain` and calls are refused by then, and calling `shutdown` again gives
/// it back (other nodes met `LeaseHeld` until it expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_again_releases_a_lease_a_call_cancelled_after_shutdown_left() {
    let w = World::new();
    let rt = w.runtime("a", settings());
    let o = oid("o");
    let (_go, handler) = call_outliving_shutdown(&w, &rt, &o).await;
    handler.abort();
    assert!(handler.await.expect_err("aborted").is_cancelled());
    let held = w.hot.current(&o).await.expect("current").expect("the orphan");
    assert_eq!(held.holder.as_str(), "a");
    assert_eq!(rt.maintain().await.expect_err("refused").kind(), &ErrorKind::Shutdown);
    rt.shutdown().await.expect("shutdown again");
    assert_eq!(w.hot.current(&o).await.expect("current"), None, "given back");
}

/// A cold sink that fails every call with a retryable `Unavailable` while `down` is set, and
/// whose `watermark` never answers while `hang` is set.
#[derive(Debug)]
struct FlakyCold {
    inner: MemoryColdStore,
    down: std::sync::atomic::AtomicBool,
    hang: std::sync::atomic::AtomicBool,
    /// Appends that fail with a retryable `Conflict` (contention that outlasted the sink's own
    /// attempts).
    conflicts: std::sync::atomic::AtomicU32,
    /// Appends that fail with a non-retryable `Conflict` (a sink that gave up on this commit,
    /// such as dotdo-iceberg's "too slow to commit").
    refusals: std::sync::atomic::AtomicU32,
    /// Appends holding this object fail with a non-retryable `InvalidInput` (a sink refusing
    /// the object's records for good).
    refused_object: parking_lot::Mutex<Option<ObjectId>>,
    /// Every append fails with a non-retryable `Backend` error (access denied).
    denied: std::sync::atomic::AtomicBool,
    /// Report commits without any watermark (a sink breaking the `ColdSink` contract).
    forget_watermarks: std::sync::atomic::AtomicBool,
    /// Appends that answer `AmbiguousOutcome` without landing.
    ambiguous_appends: std::sync::atomic::AtomicU32,
    /// Appends that land, then answer `AmbiguousOutcome` (the reply was lost).
    lost_replies: std::sync::atomic::AtomicU32,
    /// `load_state` calls so far.
    loads: std::sync::atomic::AtomicU64,
    /// The most change records one `read_changes`/`read_changes_through` returned.
    most_changes_read: std::sync::atomic::AtomicUsize,
    /// Run (once) before the next append: a pause, or something that happens meanwhile.
    before_append: Hook<futures::future::BoxFuture<'static, ()>>,
    /// Run before every append.
    each_append: Hook<Arc<dyn Fn() + Send + Sync>>,
    /// Run before every `watermark` read.
    each_watermark: Hook<Arc<dyn Fn() + Send + Sync>>,
    /// Run (once) before the next `load_state`: a slow read of the whole state.
    before_load: Hook<futures::future::BoxFuture<'static, ()>>,
    /// Run (once) before the next `read_changes` or `read_changes_through`: a slow read.
    before_read_changes: Hook<futures::future::BoxFuture<'static, ()>>,
    /// An entry added to every loaded state (a sink that broke its contract).
    extra_entry: parking_lot::Mutex<Option<Entry>>,
    /// `snapshots` answers without the newest snapshot (a catalog replica lagging behind the
    /// one the watermark was read from).
    lagging_snapshots: std::sync::atomic::AtomicBool,
    /// `watermark` answers this (a replica lagging behind the one the snapshots come from).
    stale_watermark: parking_lot::Mutex<Option<Watermark>>,
    /// `load_state` of the latest state answers the state at the second-newest snapshot (a
    /// replica lagging behind the one the watermark was read from).
    lagging_loads: std::sync::atomic::AtomicBool,
}

/// A test hook slot (not `Debug` itself).
struct Hook<T>(parking_lot::Mutex<Option<T>>);

impl<T> Hook<T> {
    fn new() -> Self {
        Hook(parking_lot::Mutex::new(None))
    }
    fn lock(&self) -> parking_lot::MutexGuard<'_, Option<T>> {
        self.0.lock()
    }
}

impl<T> std::fmt::Debug for Hook<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

impl FlakyCold {
    fn new(inner: MemoryColdStore) -> Self {
        FlakyCold {
            inner,
            down: false.into(),
            hang: false.into(),
            conflicts: 0.into(),
            refusals: 0.into(),
            refused_object: Default::default(),
            denied: false.into(),
            forget_watermarks: false.into(),
            ambiguous_appends: 0.into(),
            lost_replies: 0.into(),
            loads: 0.into(),
            most_changes_read: 0.into(),
            before_append: Hook::new(),
            each_append: Hook::new(),
            each_watermark: Hook::new(),
            before_load: Hook::new(),
            before_read_changes: Hook::new(),
            extra_entry: parking_lot::Mutex::new(None),
            lagging_snapshots: false.into(),
            lagging_loads: false.into(),
            stale_watermark: parking_lot::Mutex::new(None),
        }
    }
}

impl FlakyCold {
    fn check(&self) -> Result<()> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::unavailable("cold store down (test)"));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl ColdSink for FlakyCold {
    async fn append(&self, batch: ColdBatch) -> Result<ColdCommit> {
        self.check()?;
        let before = self.before_append.lock().take();
        if let Some(f) = before {
            f.await;
        }
        let each = self.each_append.lock().clone();
        if let Some(f) = each {
            f();
        }
        let left = self.ambiguous_appends.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.ambiguous_appends.store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::new(ErrorKind::AmbiguousOutcome, "the commit's reply was lost (test)"));
        }
        let left = self.conflicts.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.conflicts.store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::new(ErrorKind::Conflict, "still conflicting (test)").with_retryable(true));
        }
        let left = self.refusals.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.refusals.store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::new(ErrorKind::Conflict, "too slow to commit (test)").with_retryable(false));
        }
        if self.denied.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::backend("access denied (test)").with_retryable(false));
        }
        let refused = self.refused_object.lock().clone();
        if let Some(o) = refused.filter(|o| batch.objects.iter().any(|c| &c.object == o)) {
            return Err(Error::invalid(format!("{o}: its records refused for good (test)")));
        }
        let mut commit = self.inner.append(batch).await?;
        let lost = self.lost_replies.load(std::sync::atomic::Ordering::SeqCst);
        if lost > 0 {
            self.lost_replies.store(lost - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::new(ErrorKind::AmbiguousOutcome, "the commit landed, its reply was lost (test)"));
        }
        if self.forget_watermarks.load(std::sync::atomic::Ordering::SeqCst) {
            commit.watermarks.clear();
            // A real store waits on I/O here: a drain that loops on this answer yields, so the
            // test's timeout fires instead of the test hanging.
            tokio::task::yield_now().await;
        }
        Ok(commit)
    }
    async fn watermark(&self, object: &ObjectId) -> Result<Watermark> {
        self.check()?;
        let each = self.each_watermark.lock().clone();
        if let Some(f) = each {
            f();
        }
        if self.hang.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if let Some(stale) = *self.stale_watermark.lock() {
            return Ok(stale);
        }
        self.inner.watermark(object).await
    }
    async fn head(&self, object: &ObjectId) -> Result<(Option<SnapshotId>, Watermark)> {
        self.check()?;
        let lagging =
            self.lagging_snapshots.load(std::sync::atomic::Ordering::SeqCst) || self.stale_watermark.lock().is_some();
        if lagging {
            // Separate reads, as a sink without a single read of its table answers.
            return dotdo_core::cold::head_by_reads(self, object).await;
        }
        self.inner.head(object).await
    }
    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.check()?;
        let mut snapshots = self.inner.snapshots().await?;
        if self.lagging_snapshots.load(std::sync::atomic::Ordering::SeqCst) {
            snapshots.pop();
        }
        Ok(snapshots)
    }
    async fn load_state(&self, object: &ObjectId, as_of: AsOf) -> Result<ColdState> {
        self.check()?;
        self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let before = self.before_load.lock().take();
        if let Some(f) = before {
            f.await;
        }
        let as_of = match as_of {
            AsOf::Latest if self.lagging_loads.load(std::sync::atomic::Ordering::SeqCst) => {
                let snapshots = self.inner.snapshots().await?;
                AsOf::Snapshot(snapshots[snapshots.len() - 2].id)
            }
            as_of => as_of,
        };
        let mut state = self.inner.load_state(object, as_of).await?;
        state.entries.extend(self.extra_entry.lock().clone());
        Ok(state)
    }
    async fn read_changes(&self, object: &ObjectId, after: Seq, as_of: AsOf) -> Result<Vec<ChangeRecord>> {
        self.check()?;
        let before = self.before_read_changes.lock().take();
        if let Some(f) = before {
            f.await;
        }
        let r = self.inner.read_changes(object, after, as_of).await?;
        self.most_changes_read.fetch_max(r.len(), std::sync::atomic::Ordering::SeqCst);
        Ok(r)
    }
    async fn read_changes_through(
        &self,
        object: &ObjectId,
        after: Seq,
        through: Seq,
        as_of: AsOf,
    ) -> Result<Vec<ChangeRecord>> {
        self.check()?;
        let before = self.before_read_changes.lock().take();
        if let Some(f) = before {
            f.await;
        }
        let r = self.inner.read_changes_through(object, after, through, as_of).await?;
        self.most_changes_read.fetch_max(r.len(), std::sync::atomic::Ordering::SeqCst);
        Ok(r)
    }
}

/// A runtime on a cold sink that goes down after the first (flushed) increment of `o`: the second
/// increment commits, and its automatic flush fails (its retries sleep on the manual clock,
/// kept moving meanwhile). Cold stays down.
async fn a_failed_auto_flush(w: &World, settings: RuntimeSettings) -> (Arc<FlakyCold>, ObjectRuntime, ObjectId) {
    let (cold, rt) = w.flaky_cold_runtime(settings);
    let o = oid("o");
    assert_eq!(incr(&rt, &o).await.expect("first, flushed"), 1);
    cold.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let ticking = tick_by(w, Duration::from_millis(50));
    let second = incr(&rt, &o).await;
    ticking.abort();
    assert_eq!(second.expect("committed although cold is down"), 2);
    (cold, rt, o)
}

/// A committed write is reported as committed even when the automatic flush after it fails: a
/// caller told "failed" would repeat it. The changes reach cold exactly once with the next flush.
#[tokio::test]
async fn a_failed_auto_flush_does_not_fail_a_committed_call() {
    let w = World::new();
    let (cold, rt, o) = a_failed_auto_flush(&w, RuntimeSettings { flush_after_changes: 1, ..settings() }).await;
    assert_eq!(rt.metrics().flush_failures, 1);
    assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 1, "the second change is still pending");
    cold.down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(incr(&rt, &o).await.expect("third, flushed with the pending second"), 3);
    rt.flush_all().await.expect("flush");
    let changes = w.cold.read_changes(&o, 0, AsOf::Latest).await.expect("cold changes");
    assert_eq!(changes.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2, 3], "every change once");
}

/// An automatic flush refused for a reason about its object (not cold being out of reach)
/// pauses only that object's automatic flushes: pausing the runtime's, an object refused at
/// every commit held back every other object's (here, with the clock stopped, for good).
/// The object's pause outlives its activation (with `keep_warm = 0` every call is an activation
/// of its own: a pause kept with the activation was gone at the next call).
#[tokio::test]
async fn one_objects_refused_auto_flush_does_not_hold_back_the_others() {
    for keep_warm in [settings().keep_warm, Duration::ZERO] {
        let w = World::new();
        let (cold, rt) = w.flaky_cold_runtime(RuntimeSettings { flush_after_changes: 1, keep_warm, ..settings() });
        let (a, b) = (oid("a"), oid("b"));
        *cold.refused_object.lock() = Some(a.clone());
        for n in 1..=5 {
            assert_eq!(incr(&rt, &a).await.expect("committed although its flush is refused"), n);
            assert_eq!(incr(&rt, &b).await.expect("committed"), n);
            assert_eq!(w.cold.watermark(&b).await.expect("wm").through, n, "b flushed after commit {n}");
        }
        assert_eq!(w.cold.watermark(&a).await.expect("wm").through, 0);
        assert_eq!(rt.metrics().flush_failures, 1, "{keep_warm:?}: a's next flushes wait out its own pause");
        // a's pause ends like the runtime's did: a commit after it flushes everything pending.
        *cold.refused_object.lock() = None;
        w.clock.advance(dotdo_core::runtime::AUTO_FLUSH_PAUSE * 2);
        assert_eq!(incr(&rt, &a).await.expect("flushed again"), 6);
        assert_eq!(w.cold.watermark(&a).await.expect("wm").through, 6);
    }
}

/// An object drained by `flush` (the refusal mended) ends its automatic flushes' pause: the
/// next commit flushes again at once (the pause ran on, up to a minute, after the drain).
#[tokio::test]
async fn a_drained_object_ends_its_auto_flush_pause() {
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(RuntimeSettings { flush_after_changes: 1, ..settings() });
    let a = oid("a");
    *cold.refused_object.lock() = Some(a.clone());
    assert_eq!(incr(&rt, &a).await.expect("committed although its flush is refused"), 1);
    assert_eq!(rt.metrics().flush_failures, 1);
    *cold.refused_object.lock() = None;
    rt.flush(&a).await.expect("drained by hand");
    assert_eq!(w.cold.watermark(&a).await.expect("wm").through, 1);
    assert_eq!(incr(&rt, &a).await.expect("committed"), 2);
    assert_eq!(w.cold.watermark(&a).await.expect("wm").through, 2, "flushed at once, the clock unmoved");
}

/// A non-retryable failure of cold storage as a whole (access denied, a full warehouse: a
/// `Backend` error) pauses every object's automatic flushes, as an outage does: it is about no
/// one object, and each object paying a failing flush of its own before backing off only itself
/// is what the runtime-wide pause is for.
#[tokio::test]
async fn a_refusal_by_cold_storage_as_a_whole_pauses_every_objects_auto_flush() {
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(RuntimeSettings { flush_after_changes: 1, ..settings() });
    let (a, b) = (oid("a"), oid("b"));
    cold.denied.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(incr(&rt, &a).await.expect("committed"), 1);
    assert_eq!(incr(&rt, &b).await.expect("committed"), 1);
    assert_eq!(rt.metrics().flush_failures, 1, "b's flush waits out the runtime's pause");
    cold.denied.store(false, std::sync::atomic::Ordering::SeqCst);
    w.clock.advance(dotdo_core::runtime::AUTO_FLUSH_PAUSE * 2);
    assert_eq!(incr(&rt, &b).await.expect("flushed again"), 2);
    assert_eq!(w.cold.watermark(&b).await.expect("wm").through, 2);
}

/// After an automatic flush fails, the next commits skip theirs for a while (`AUTO_FLUSH_PAUSE`,
/// doubling): each ran the flush's retries inside the call, after its write was durable, so
/// every call of a busy object waited out a cold outage (here, with the clock stopped, they
/// never returned). Once the pause is over a commit flushes again, everything pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_auto_flush_calls_do_not_wait_for_cold_storage() {
    use dotdo_core::runtime::AUTO_FLUSH_PAUSE;
    let w = World::new();
    let (cold, rt, o) = a_failed_auto_flush(&w, RuntimeSettings { flush_after_changes: 1, ..settings() }).await;
    assert_eq!(rt.metrics().flush_failures, 1);
    // The clock stands still: a flush's retries would never end.
    for n in 3..=6 {
        let call = tokio::time::timeout(Duration::from_secs(5), incr(&rt, &o)).await;
        assert_eq!(call.expect("the call does not wait for cold storage").expect("committed"), n);
    }
    assert_eq!(rt.metrics().flush_failures, 1, "no flush tried during the pause");
    cold.down.store(false, std::sync::atomic::Ordering::SeqCst);
    w.clock.advance(AUTO_FLUSH_PAUSE * 2);
    assert_eq!(incr(&rt, &o).await.expect("flushed again"), 7);
    assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 7, "everything pending flushed");
}

/// The automatic-flush pause doubles with failures in a row; commits that flush nothing (below
/// the threshold, here another object's) do not reset it: they did, so during a cold outage
/// the pause never grew past its first second, and a caller paid a failing flush every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_below_the_flush_threshold_do_not_end_the_auto_flush_backoff() {
    use dotdo_core::runtime::AUTO_FLUSH_PAUSE;
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(RuntimeSettings { flush_after_changes: 2, ..settings() });
    let (o, p) = (oid("o"), oid("p"));
    assert_eq!(incr(&rt, &o).await.expect("below the threshold"), 1);
    assert_eq!(get(&rt, &p, "n").await.expect("p activated (its activation reads cold)"), None);
    cold.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let failing_flush = |n: u64| {
        // Small ticks: those between the failure (the pause set) and the abort count against
        // the pause.
        let (rt, o, ticking) = (rt.clone(), o.clone(), tick_by(&w, Duration::from_millis(5)));
        async move {
            let r = incr(&rt, &o).await;
            ticking.abort();
            assert_eq!(r.expect("committed although cold is down"), n);
        }
    };
    failing_flush(2).await;
    assert_eq!(rt.metrics().flush_failures, 1);
    w.clock.advance(AUTO_FLUSH_PAUSE * 3 / 2);
    assert_eq!(incr(&rt, &p).await.expect("another object, below the threshold"), 1);
    failing_flush(3).await;
    assert_eq!(rt.metrics().flush_failures, 2, "the pause was over");
    // The second failure in a row doubled the pause: half again of the first is not enough.
    w.clock.advance(AUTO_FLUSH_PAUSE * 3 / 2);
    let call = tokio::time::timeout(Duration::from_secs(5), incr(&rt, &o)).await;
    assert_eq!(call.expect("no flush tried: the call does not wait for cold").expect("committed"), 4);
    assert_eq!(rt.metrics().flush_failures, 2, "still paused");
}

/// An automatic flush makes one cold commit per call: a backlog an outage left (here three
/// commits' worth) is not drained inside one caller's call (six commits of retries and writes a
/// caller may time out on, and then repeat a write that happened); the next calls and
/// `flush_all` drain the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_automatic_flush_drains_one_commit_per_call() {
    use dotdo_core::runtime::AUTO_FLUSH_PAUSE;
    let w = World::new();
    let settings = RuntimeSettings { flush_after_changes: 1, flush_batch_records: 2, ..settings() };
    let (cold, rt, o) = a_failed_auto_flush(&w, settings).await;
    for n in 3..=7 {
        assert_eq!(incr(&rt, &o).await.expect("committed during the pause"), n);
    }
    cold.down.store(false, std::sync::atomic::Ordering::SeqCst);
    w.clock.advance(AUTO_FLUSH_PAUSE * 2);
    let snapshots = w.cold.snapshots().await.expect("snapshots").len();
    assert_eq!(incr(&rt, &o).await.expect("commits, then flushes once"), 8);
    assert_eq!(w.cold.snapshots().await.expect("snapshots").len(), snapshots + 1, "one cold commit");
    assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 3, "two more records (flush_batch_records)");
    rt.flush_all().await.expect("flush the rest");
    assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 8);
}

/// A sink whose commits leave an appended object out of their watermarks makes `flush` and
/// `flush_all` fail with `Backend`, instead of draining the same changes again forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_reports_no_watermark_fails_the_flush_instead_of_looping() {
    let w = World::new();
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    cold.forget_watermarks.store(true, std::sync::atomic::Ordering::SeqCst);
    let rt = w.runtime_with("a", Arc::new(w.hot.clone()), cold.clone(), settings());
    let (o, p) = (oid("o"), oid("p"));
    incr(&rt, &o).await.expect("write");
    incr(&rt, &p).await.expect("write");
    let (r, x) = (rt.clone(), o.clone());
    let one = tokio::time::timeout(Duration::from_secs(10), tokio::spawn(async move { r.flush(&x).await }))
        .await
        .expect("flush returns")
        .expect("join");
    let err = one.expect_err("flush fails");
    assert!(matches!(err.kind(), ErrorKind::Backend), "{err}");
    assert!(err.to_string().contains("durable only through seq 0"), "{err}");
    let r = rt.clone();
    let all = tokio::time::timeout(Duration::from_secs(10), tokio::spawn(async move { r.flush_all().await }))
        .await
        .expect("flush_all returns")
        .expect("join");
    assert!(matches!(all.expect_err("flush_all fails").kind(), ErrorKind::Backend));
    assert_eq!(w.hot.object_info(&p).await.expect("info").map_or(0, |i| i.truncated_through), 0, "not truncated");
    // A sink that keeps the contract again drains both, each change once.
    cold.forget_watermarks.store(false, std::sync::atomic::Ordering::SeqCst);
    rt.flush_all().await.expect("flush");
    for x in [&o, &p] {
        let changes = w.cold.read_changes(x, 0, AsOf::Latest).await.expect("cold changes");
        assert_eq!(changes.iter().map(|c| c.seq).collect::<Vec<_>>(), [1], "{x}: once");
    }
}

/// A guard that fails the next `refresh` calls with a retryable `Unavailable`.
#[derive(Debug)]
struct FlakyGuard {
    inner: MemoryBackend,
    fail_refreshes: std::sync::atomic::AtomicU32,
    /// Refreshes never answer (a hung connection).
    hang_refreshes: std::sync::atomic::AtomicBool,
    /// Refreshes apply, then report `AmbiguousOutcome` (the connection dropped after sending).
    ambiguous_refreshes: std::sync::atomic::AtomicU32,
    /// Refreshes fail with a non-retryable backend error.
    broken_refreshes: std::sync::atomic::AtomicU32,
    /// Acquires fail with a non-retryable backend error.
    broken_acquires: std::sync::atomic::AtomicU32,
    /// Acquires apply, then report `AmbiguousOutcome`.
    ambiguous_acquires: std::sync::atomic::AtomicU32,
    /// Acquires apply, then never answer (the caller gives up on them).
    hang_acquires: std::sync::atomic::AtomicBool,
    /// Acquires do not apply, and report `AmbiguousOutcome`.
    refused_ambiguous_acquires: std::sync::atomic::AtomicU32,
    /// Acquires run on a task of their own that applies them 100 ms (real time) later, as a
    /// blocking task or a queued request does, also after the caller gave up.
    late_acquires: std::sync::atomic::AtomicBool,
    /// With `late_acquires`: each late acquire waits for a permit of `late_gate` instead of
    /// 100 ms, and counts itself in `late_waiting` first (the test decides when each lands).
    gate_late: std::sync::atomic::AtomicBool,
    late_gate: Arc<tokio::sync::Semaphore>,
    late_waiting: Arc<std::sync::atomic::AtomicU32>,
    /// Releases that fail with a retryable `Unavailable`.
    fail_releases: std::sync::atomic::AtomicU32,
    /// Releases never answer (a hung connection).
    hang_releases: std::sync::atomic::AtomicBool,
    /// Releases that hung so far.
    hung_releases: std::sync::atomic::AtomicU32,
    /// Each refresh takes this long on the world's clock (a slow guard), then applies.
    slow_refreshes: parking_lot::Mutex<Option<(dotdo_core::ManualClock, Duration)>>,
    /// Refreshes grant half the TTL asked for (a guard whose clock is behind the runtime's).
    short_refreshes: std::sync::atomic::AtomicBool,
    /// Refreshes answer with the next token (a guard breaking the contract).
    retoken_refreshes: std::sync::atomic::AtomicBool,
    /// Refreshes asked for.
    refreshes: std::sync::atomic::AtomicU32,
    /// Lease checks (`validate`) that fail with a retryable `Unavailable`.
    fail_validates: std::sync::atomic::AtomicU32,
    /// Lease checks never answer (a hung connection).
    hang_validates: std::sync::atomic::AtomicBool,
    /// Lease lookups (`current`) never answer.
    hang_currents: std::sync::atomic::AtomicBool,
    /// Lease checks answer on their second poll (a blocking task, a network call), not at once.
    yielding_validates: std::sync::atomic::AtomicBool,
    /// Each acquire takes this long on the world's clock before the guard grants it (its lease
    /// then lasts that much past what the runtime counts from sending it).
    slow_acquires: parking_lot::Mutex<Option<(dotdo_core::ManualClock, Duration)>>,
    /// Each lease lookup (`current`) takes this long on the world's clock, then answers.
    slow_currents: parking_lot::Mutex<Option<(dotdo_core::ManualClock, Duration)>>,
}

impl FlakyGuard {
    fn new(w: &World) -> Self {
        FlakyGuard {
            inner: w.hot.clone(),
            fail_refreshes: 0.into(),
            hang_refreshes: false.into(),
            ambiguous_refreshes: 0.into(),
            broken_refreshes: 0.into(),
            broken_acquires: 0.into(),
            ambiguous_acquires: 0.into(),
            hang_acquires: false.into(),
            refused_ambiguous_acquires: 0.into(),
            late_acquires: false.into(),
            gate_late: false.into(),
            late_gate: Arc::new(tokio::sync::Semaphore::new(0)),
            late_waiting: Arc::default(),
            fail_releases: 0.into(),
            hang_releases: false.into(),
            hung_releases: 0.into(),
            slow_refreshes: parking_lot::Mutex::new(None),
            short_refreshes: false.into(),
            retoken_refreshes: false.into(),
            refreshes: 0.into(),
            fail_validates: 0.into(),
            hang_validates: false.into(),
            hang_currents: false.into(),
            yielding_validates: false.into(),
            slow_acquires: parking_lot::Mutex::new(None),
            slow_currents: parking_lot::Mutex::new(None),
        }
    }
}

#[async_trait::async_trait]
impl ConsistencyGuard for FlakyGuard {
    async fn acquire(&self, object: &ObjectId, holder: &NodeId, ttl: Duration) -> Result<Lease> {
        let left = self.broken_acquires.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.broken_acquires.store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::backend("lease table unreadable (test)"));
        }
        let left = self.ambiguous_acquires.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.ambiguous_acquires.store(left - 1, std::sync::atomic::Ordering::SeqCst);
            self.inner.acquire(object, holder, ttl).await?;
            return Err(Error::new(ErrorKind::AmbiguousOutcome, "connection reset after sending (test)"));
        }
        let left = self.refused_ambiguous_acquires.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.refused_ambiguous_acquires.store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::new(ErrorKind::AmbiguousOutcome, "connection reset before sending (test)"));
        }
        if self.late_acquires.load(std::sync::atomic::Ordering::SeqCst) {
            let (inner, object, holder) = (self.inner.clone(), object.clone(), holder.clone());
            let gate = self.gate_late.load(std::sync::atomic::Ordering::SeqCst);
            let (permits, waiting) = (self.late_gate.clone(), self.late_waiting.clone());
            let late = tokio::spawn(async move {
                if gate {
                    waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    permits.acquire().await.expect("gate").forget();
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                inner.acquire(&object, &holder, ttl).await
            });
            return late.await.expect("task");
        }
        if let Some((clock, takes)) = self.slow_acquires.lock().clone() {
            clock.advance(takes);
        }
        let l = self.inner.acquire(object, holder, ttl).await?;
        if self.hang_acquires.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(l)
    }
    async fn refresh(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        self.refreshes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some((clock, takes)) = self.slow_refreshes.lock().clone() {
            clock.advance(takes);
        }
        if self.hang_refreshes.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let left = self.fail_refreshes.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.fail_refreshes.store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::unavailable("guard unreachable (test)"));
        }
        let left = self.broken_refreshes.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.broken_refreshes.store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::backend("lease table unreadable (test)"));
        }
        let left = self.ambiguous_refreshes.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.ambiguous_refreshes.store(left - 1, std::sync::atomic::Ordering::SeqCst);
            self.inner.refresh(lease, ttl).await?;
            return Err(Error::new(ErrorKind::AmbiguousOutcome, "connection lost after sending (test)"));
        }
        let short = self.short_refreshes.load(std::sync::atomic::Ordering::SeqCst);
        let mut l = self.inner.refresh(lease, if short { ttl / 2 } else { ttl }).await?;
        if self.retoken_refreshes.load(std::sync::atomic::Ordering::SeqCst) {
            l.token = l.token.next();
        }
        Ok(l)
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        let left = self.fail_releases.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.fail_releases.store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::unavailable("guard unreachable (test)"));
        }
        if self.hang_releases.load(std::sync::atomic::Ordering::SeqCst) {
            self.hung_releases.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            futures::future::pending::<()>().await;
        }
        self.inner.release(lease).await
    }
    async fn validate(&self, lease: &Lease) -> Result<()> {
        let left = self.fail_validates.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.fail_validates.store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::unavailable("guard unreachable (test)"));
        }
        if self.hang_validates.load(std::sync::atomic::Ordering::SeqCst) {
            futures::future::pending::<()>().await;
        }
        if self.yielding_validates.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        self.inner.validate(lease).await
    }
    async fn current(&self, object: &ObjectId) -> Result<Option<Lease>> {
        if self.hang_currents.load(std::sync::atomic::Ordering::SeqCst) {
            futures::future::pending::<()>().await;
        }
        if let Some((clock, takes)) = self.slow_currents.lock().clone() {
            clock.advance(takes);
        }
        self.inner.current(object).await
    }
}

/// A world, runtime "a" under a [`FlakyGuard`], and object `o` activated by one increment.
async fn activated_under_a_flaky_guard() -> (World, Arc<FlakyGuard>, ObjectRuntime, ObjectId) {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(settings());
    let o = oid("o");
    assert_eq!(incr(&rt, &o).await.expect("activate"), 1);
    (w, guard, rt, o)
}

/// A guard whose renewed leases have less than two thirds of the TTL left (its clock behind the
/// runtime's) is refreshed at most every tenth of the TTL during a long handler, which goes on
/// and commits. Every wait was zero: a refresh per millisecond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the renewal task runs between the steps
async fn renewals_under_a_guard_granting_short_leases_are_paced() {
    let (w, guard, rt, o) = activated_under_a_flaky_guard().await;
    guard.short_refreshes.store(true, std::sync::atomic::Ordering::SeqCst);
    let (tx, task) = put_until_signalled(&rt, &o);
    let asleep = || async {
        while w.clock.pending_sleeps() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    asleep().await;
    let before = guard.refreshes.load(std::sync::atomic::Ordering::SeqCst);
    // Two TTLs in 200 steps, each once the renewal task is asleep again.
    for _ in 0..200 {
        w.clock.advance(TTL / 100);
        asleep().await;
    }
    let refreshes = guard.refreshes.load(std::sync::atomic::Ordering::SeqCst) - before;
    tx.send(()).expect("signal");
    task.await.expect("join").expect("the handler commits");
    assert!((10..=40).contains(&refreshes), "{refreshes} refreshes in two TTLs");
    assert_eq!(get(&rt, &o, "k").await.expect("get").as_deref(), Some(&b"v"[..]));
}

/// A refresh that comes back under another token (a guard breaking the contract) loses the
/// lease: the handler's reads were made under the old token, and its writes are not committed
/// under the new one: after the renewal during a handler, and after the refresh before a
/// commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_under_another_token_loses_the_lease() {
    let (w, guard, rt, o) = activated_under_a_flaky_guard().await;
    guard.retoken_refreshes.store(true, std::sync::atomic::Ordering::SeqCst);
    // The refresh before a commit (the lease within the commit margin) and the renewal during a
    // handler: each call activates afresh (after the old lease ran out), then the clock moves.
    // Moved before the renewal's first poll, the clock leaves it asleep (its wait is reckoned
    // from then): only the commit's refresh runs. Moved after, past a third of the TTL: the
    // renewal runs.
    for (step, renewal_asleep_first) in [(TTL - Duration::from_millis(1), false), (TTL * 2 / 5, true)] {
        w.clock.advance(TTL * 2);
        let clock = w.clock.clone();
        let e = rt
            .invoke(&o, async move |t: &mut ObjectTxn<'_>| {
                let n = t.get("n").await?;
                if renewal_asleep_first {
                    for _ in 0..20 {
                        tokio::task::yield_now().await;
                    }
                }
                clock.advance(step);
                for _ in 0..20 {
                    tokio::task::yield_now().await;
                }
                t.put("n", "100")?;
                Ok::<_, Error>(n)
            })
            .await
            .expect_err("renewed under another token");
        assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{step:?}: {e}");
    }
    guard.retoken_refreshes.store(false, std::sync::atomic::Ordering::SeqCst);
    w.clock.advance(TTL * 2);
    assert_eq!(incr(&rt, &o).await.expect("a fresh lease"), 2, "nothing was written under a new token");
}

/// A commit whose lease needs a refresh first, from a guard that never answers (a hung
/// connection), ends once the lease has run out, writing nothing: it waited for ever, holding
/// the object's slot, so every later call on the object waited too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the clock ticks while the call waits
async fn a_hung_refresh_before_a_commit_ends_when_the_lease_runs_out() {
    let (w, guard, rt, o) = activated_under_a_flaky_guard().await;
    let (clock, g, rt2, o2) = (w.clock.clone(), guard.clone(), rt.clone(), o.clone());
    let call = tokio::spawn(async move {
        rt2.invoke(&o2, async move |t: &mut ObjectTxn<'_>| {
            t.put("n", "100")?;
            // Within the commit margin of the lease's end, the guard hung from here on.
            g.hang_refreshes.store(true, std::sync::atomic::Ordering::SeqCst);
            clock.advance(TTL - Duration::from_millis(1));
            Ok::<_, Error>(())
        })
        .await
    });
    let ticking = tick(&w);
    let ended = tokio::time::timeout(Duration::from_secs(10), call).await;
    ticking.abort();
    let e = ended.expect("the call ends once the lease ran out").expect("join").expect_err("not committed");
    assert!(e.is_retryable() || matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    guard.hang_refreshes.store(false, std::sync::atomic::Ordering::SeqCst);
    w.clock.advance(TTL * 2);
    assert_eq!(incr(&rt, &o).await.expect("calls go on"), 2, "nothing of the hung call was written");
}

/// `flush` of an object with no holder takes its lease only to drain it, and gives it back at
/// once, as `flush_all` does: kept warm for `keep_warm`, it refused the owner's calls.
#[tokio::test]
async fn a_flush_gives_back_a_lease_it_took_only_to_drain() {
    let w = World::new();
    let o = oid("o");
    let b = w.runtime("b", RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    incr(&b, &o).await.expect("b's call, released after it");
    assert!(w.hot.is_available(&o).await.expect("available"));
    let a = w.runtime("a", settings());
    assert_eq!(a.flush(&o).await.expect("flush").records, 1);
    assert!(w.hot.is_available(&o).await.expect("available"), "a gave the lease back");
    assert_eq!(incr(&b, &o).await.expect("the owner goes on"), 2);
}

/// `flush` and `evict` of an object with no holder, cancelled by the host while the drain's
/// cold append hangs, leave the lease they took only for that to `maintain`, which gives it back:
/// it stayed warm in the slot, renewed by `maintain` for `keep_warm`, and the owner met
/// `LeaseHeld`. An eviction whose drain fails gives such a lease back at once.
#[tokio::test]
async fn a_cancelled_flush_or_evict_gives_back_a_lease_taken_only_for_it() {
    let w = World::new();
    let o = oid("o");
    let b = w.runtime("b", RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    let (cold, a) = w.flaky_cold_runtime(settings());
    let mut n = 0;
    for cancelled in ["flush", "evict"] {
        n += 1;
        assert_eq!(incr(&b, &o).await.expect("b's call, released after it"), n);
        *cold.before_append.lock() = Some(Box::pin(futures::future::pending()));
        let op = async {
            match cancelled {
                "flush" => a.flush(&o).await.map(|_| ()),
                _ => a.evict(&o).await,
            }
        };
        assert!(tokio::time::timeout(Duration::from_millis(20), op).await.is_err(), "{cancelled} hangs");
        cold.before_append.lock().take();
        a.maintain().await.expect("maintain");
        assert!(w.hot.is_available(&o).await.expect("available"), "{cancelled}: given back by maintain");
    }
    n += 1;
    assert_eq!(incr(&b, &o).await.expect("the owner goes on"), n);
    cold.down.store(true, std::sync::atomic::Ordering::SeqCst);
    // The drain's retries sleep on the manual clock, kept moving meanwhile.
    let ticking = tick_by(&w, Duration::from_millis(50));
    let failed = a.evict(&o).await;
    ticking.abort();
    failed.expect_err("cold storage is down");
    cold.down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(w.hot.is_available(&o).await.expect("available"), "a failed eviction gave back its lease");
    assert_eq!(incr(&b, &o).await.expect("the owner goes on"), n + 1);
}

/// A `maintain` whose lease refresh never answers (a hung guard connection) ends once the lease
/// has run out, and drops the activation: it waited for ever, holding the object's slot, so
/// every call on the object waited too. Calls go on once the guard answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the maintain task runs between the steps
async fn a_hung_refresh_in_maintain_ends_when_the_lease_runs_out() {
    let (w, guard, rt, o) = activated_under_a_flaky_guard().await;
    // Past the point where `maintain` refreshes; the refresh hangs.
    w.clock.advance(TTL / 2);
    guard.hang_refreshes.store(true, std::sync::atomic::Ordering::SeqCst);
    let rt2 = rt.clone();
    let maintain = tokio::spawn(async move { rt2.maintain().await });
    while w.clock.pending_sleeps() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    w.clock.advance(TTL);
    tokio::time::timeout(Duration::from_secs(10), maintain)
        .await
        .expect("maintain ends once the lease ran out")
        .expect("join")
        .expect("maintain");
    guard.hang_refreshes.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(incr(&rt, &o).await.expect("a new activation"), 2);
    // The same with the release that follows hanging too: it is left to the orphan path.
    w.clock.advance(TTL / 2);
    guard.hang_refreshes.store(true, std::sync::atomic::Ordering::SeqCst);
    guard.hang_releases.store(true, std::sync::atomic::Ordering::SeqCst);
    let rt2 = rt.clone();
    let maintain = tokio::spawn(async move { rt2.maintain().await });
    for _ in 0..2 {
        while w.clock.pending_sleeps() == 0 && !maintain.is_finished() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        w.clock.advance(TTL * 2);
    }
    tokio::time::timeout(Duration::from_secs(10), maintain)
        .await
        .expect("maintain ends although the release hangs")
        .expect("join")
        .expect("maintain");
    guard.hang_refreshes.store(false, std::sync::atomic::Ordering::SeqCst);
    guard.hang_releases.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(incr(&rt, &o).await.expect("a new activation"), 3);
}

/// A leftover lease (its release after a call failed) that `maintain` is releasing stays this
/// node's to the object's calls meanwhile: a call waits for that release (the object's slot),
/// then activates. It was taken off the list before the release, and a call meanwhile found the
/// guard's refusal naming this very node and took it for another's (`LeaseHeld`); a flush
/// owing the object forgot it the same way, leaving its changes in hot storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: lets the call run into the race
async fn a_call_during_maintains_release_of_a_leftover_lease_is_not_refused() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    let x = oid("x");
    guard.fail_releases.store(1, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(incr(&rt, &x).await.expect("first"), 1, "its release after the call fails: a leftover");
    guard.hang_releases.store(true, std::sync::atomic::Ordering::SeqCst);
    let rt2 = rt.clone();
    let maintain = tokio::spawn(async move { rt2.maintain().await });
    while guard.hung_releases.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    guard.hang_releases.store(false, std::sync::atomic::Ordering::SeqCst);
    // The call runs into the release in flight (before any clock time passes: the leftover
    // lease is still current at the guard).
    let rt3 = rt.clone();
    let x3 = x.clone();
    let call = tokio::spawn(async move { incr(&rt3, &x3).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The hung release gives up after a TTL (the clock's); the call then goes on.
    while !maintain.is_finished() {
        w.clock.advance(TTL);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    maintain.await.expect("join").expect("maintain");
    let n = tokio::time::timeout(Duration::from_secs(10), call).await.expect("the call ends").expect("join");
    assert_eq!(n.expect("not refused as another node's"), 2);
}

/// A shutdown whose lease releases never answer (a hung guard connection) gives the leases
/// back within one lease TTL in all, not one TTL per warm object (five TTLs here); the leases it
/// could not give back expire, and another node takes the objects over then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the clock ticks while shutdown waits
async fn a_shutdown_under_a_hung_guard_gives_leases_back_within_one_ttl() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(settings());
    let objects: Vec<ObjectId> = (0..5).map(|i| oid(&format!("o{i}"))).collect();
    for o in &objects {
        assert_eq!(incr(&rt, o).await.expect("activate"), 1);
    }
    guard.hang_releases.store(true, std::sync::atomic::Ordering::SeqCst);
    let started = w.clock.monotonic();
    let ticking = tick(&w);
    let ended = tokio::time::timeout(Duration::from_secs(20), rt.shutdown()).await;
    ticking.abort();
    ended.expect("shutdown ends").expect("everything was flushed");
    let took = w.clock.monotonic().saturating_sub(started);
    assert!(took < TTL * 2, "shutdown took {took:?} of clock time, TTL {TTL:?}");
    guard.hang_releases.store(false, std::sync::atomic::Ordering::SeqCst);
    w.clock.advance(TTL * 2);
    let b = w.runtime("b", settings());
    for o in &objects {
        assert_eq!(incr(&b, o).await.expect("taken over once the lease expired"), 2);
    }
}

/// A transient refresh failure keeps a lease that is still valid: the runtime does not lock
/// itself out of its own object (acquire would answer `LeaseHeld`, naming this very node).
#[tokio::test]
async fn a_transient_refresh_failure_keeps_a_valid_lease() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(settings());
    let o = oid("o");
    assert_eq!(incr(&rt, &o).await.expect("first"), 1);
    // Past the point where a call refreshes first, well before expiry; the refresh fails once.
    w.clock.advance(TTL / 2);
    guard.fail_refreshes.store(1, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(incr(&rt, &o).await.expect("same lease, still valid"), 2);
    rt.maintain().await.expect("maintain");
    assert_eq!(incr(&rt, &o).await.expect("third"), 3);
    assert_eq!(rt.metrics().activations, 1, "the object was never re-activated");
}

/// A `maintain` cancelled while it releases leftover leases (a host's timeout around it, a
/// release that hangs) keeps the ones it has not released yet: each object's next call
/// releases its own and activates. Before, they were taken out all at once and the rest were
/// forgotten: the next call on such an object got `LeaseHeld`, naming this very node.
#[tokio::test]
async fn a_cancelled_maintain_keeps_the_leftover_leases_it_has_not_released() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    let (o1, o2) = (oid("o1"), oid("o2"));
    // Each call gives its lease back (keep_warm 0); both releases fail: two leftover leases.
    guard.fail_releases.store(2, std::sync::atomic::Ordering::SeqCst);
    incr(&rt, &o1).await.expect("o1");
    incr(&rt, &o2).await.expect("o2");
    assert!(!w.hot.is_available(&o1).await.expect("o1") && !w.hot.is_available(&o2).await.expect("o2"));
    guard.hang_releases.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::timeout(Duration::from_millis(20), rt.maintain()).await.expect_err("maintain hangs on a release");
    guard.hang_releases.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(incr(&rt, &o1).await.expect("o1 again"), 2);
    assert_eq!(incr(&rt, &o2).await.expect("o2 again"), 2);
}

/// A leftover lease whose release `maintain` started is released under the object's slot: a
/// call of the object meanwhile waits for that release. When the host gives up on `maintain`
/// (cancelled while the release hangs), the lease is put back, and the waiting call goes on;
/// its own leftover lease (its release fails too) is released by the next call. (Before the
/// slot was held, a leftover put back by a cancelled `maintain` could replace a newer one a
/// call had left meanwhile; `leave_orphan` keeps the newer one, and now no call runs then.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: shows the call waiting
async fn a_call_waits_for_maintains_release_and_goes_on_when_maintain_is_cancelled() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    let o = oid("o");
    guard.fail_releases.store(1, std::sync::atomic::Ordering::SeqCst);
    incr(&rt, &o).await.expect("first call; its release fails: a leftover lease");
    // Half the lease's time passes first: the old lease then runs out before maintain's wait for
    // the hung release (a TTL) ends, and maintain stays in that release until it is aborted.
    w.clock.advance(TTL / 2);
    // maintain takes it and its release hangs.
    guard.hang_releases.store(true, std::sync::atomic::Ordering::SeqCst);
    let maintaining = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.maintain().await })
    };
    until("maintain is in the hung release", || async {
        guard.hung_releases.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    assert!(!maintaining.is_finished(), "maintain hangs on the release");
    guard.hang_releases.store(false, std::sync::atomic::Ordering::SeqCst);
    // A second call waits for that release. Its release of the old lease and its own release
    // will fail.
    guard.fail_releases.store(2, std::sync::atomic::Ordering::SeqCst);
    let second = {
        let (rt, o) = (rt.clone(), o.clone());
        tokio::spawn(async move { incr(&rt, &o).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!second.is_finished(), "the call waits for maintain's release of the object's lease");
    // The old lease expires; the host gives up on maintain: the old lease is put back, and the
    // call goes on (its release of the old lease fails: kept until the call's own lease
    // replaces it as the newer leftover).
    w.clock.advance(TTL / 2 + Duration::from_millis(1));
    maintaining.abort();
    let _ = maintaining.await;
    let n = tokio::time::timeout(Duration::from_secs(10), second).await.expect("the call goes on").expect("join");
    assert_eq!(n.expect("second call"), 2);
    let newer = w.hot.current(&o).await.expect("current").expect("the newer leftover lease");
    assert_eq!(incr(&rt, &o).await.expect("the next call releases the newer leftover lease"), 3);
    assert!(w.hot.current(&o).await.expect("current").is_none_or(|l| l.token > newer.token));
}

/// An acquire the guard refuses for good (a `Backend` error) fails the call naming the object
/// and this node (the guard's message named neither); the next call activates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_refused_for_good_names_the_object_and_the_node() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(settings());
    let o = oid("o");
    guard.broken_acquires.store(1, std::sync::atomic::Ordering::SeqCst);
    let e = incr(&rt, &o).await.expect_err("the guard refused");
    assert_eq!(e.kind(), &ErrorKind::Backend, "{e}");
    assert!(e.to_string().contains("acquiring o on a"), "names the object and the node: {e}");
    assert_eq!(incr(&rt, &o).await.expect("the next call"), 1);
}

/// `flush_all` that meets a lease of this very node it could not give back (its release failing
/// again) reports an error, its changes not drained; it answered `Ok` having drained nothing,
/// taking the refusal for another node's lease. Once the release works, the next flush drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_that_meets_its_own_leftover_lease_reports_it() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    let o = oid("o");
    guard.fail_releases.store(2, std::sync::atomic::Ordering::SeqCst);
    incr(&rt, &o).await.expect("the call; its release fails: a leftover lease");
    let e = rt.flush_all().await.expect_err("the leftover lease could not be given back again");
    assert!(matches!(e.kind(), ErrorKind::LeaseHeld { holder, .. } if holder.as_str() == "a"), "{e}");
    let info = w.hot.object_info(&o).await.expect("info").expect("written");
    assert!(info.last_seq > info.truncated_through, "not drained: {info:?}");
    let report = rt.flush_all().await.expect("the release works now");
    assert_eq!((report.objects, report.records), (1, 1), "{report:?}");
}

/// A handler's error reached after the lease ran out is refused like a read-only answer: it
/// may rest on reads that another node's writes have made stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_reached_after_the_lease_ran_out_is_refused() {
    let (w, rt, o) = written_once().await;
    let clock = w.clock.clone();
    let r = rt
        .invoke(&o, async move |t: &mut ObjectTxn<'_>| {
            let _ = t.get("n").await?;
            clock.advance(TTL * 2);
            Err::<(), _>(Error::invalid("insufficient balance (computed from a stale read)"))
        })
        .await;
    let e = r.expect_err("refused");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    assert_eq!(rt.metrics().self_fenced, 1);
    assert!(w.hot.is_available(&o).await.expect("available"), "the lease was given back");
}

/// A write whose lease ran out before its commit could refresh it is `LeaseLost`, nothing
/// written, and counts as self-fencing (it was counted nowhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_lease_ran_out_counts_as_self_fencing() {
    let (w, rt, o) = written_once().await;
    let clock = w.clock.clone();
    let e = rt
        .invoke(&o, async move |t: &mut ObjectTxn<'_>| {
            t.put("n", "99")?;
            clock.advance(TTL * 2);
            Ok::<_, Error>(())
        })
        .await
        .expect_err("the lease ran out before the commit");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    let m = rt.metrics();
    assert_eq!((m.self_fenced, m.fenced), (1, 0), "{m:?}");
    assert_eq!(get(&rt, &o, "n").await.expect("get"), Some(Bytes::from("1")), "nothing written");
}

/// The same with a guard that does not answer at once (a blocking task, a remote request): the
/// commit is self-fencing (`LeaseLost`), not a refresh raced against a zero timer. The timer won:
/// the call failed as a retryable `Unavailable`, uncounted, and kept the run-out activation.
#[tokio::test]
async fn a_commit_whose_lease_ran_out_is_lease_lost_under_a_guard_that_answers_later() {
    let (w, guard, rt, o) = activated_under_a_flaky_guard().await;
    let (clock, g) = (w.clock.clone(), guard.clone());
    let refreshes = guard.refreshes.load(std::sync::atomic::Ordering::SeqCst);
    let e = rt
        .invoke(&o, async move |t: &mut ObjectTxn<'_>| {
            t.put("n", "99")?;
            g.hang_refreshes.store(true, std::sync::atomic::Ordering::SeqCst);
            clock.advance(TTL * 2);
            Ok::<_, Error>(())
        })
        .await
        .expect_err("the lease ran out before the commit");
    guard.hang_refreshes.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    assert_eq!(guard.refreshes.load(std::sync::atomic::Ordering::SeqCst), refreshes, "no refresh of a run-out lease");
    let m = rt.metrics();
    assert_eq!((m.self_fenced, m.fenced), (1, 0), "{m:?}");
    assert_eq!(incr(&rt, &o).await.expect("a new activation"), 2, "nothing of the call was written");
}

/// A call dropped by its caller while the handler runs, where leases go back after every call
/// (`keep_warm` 0): its lease is not kept for the next call (which takes a new one, as after
/// any call), but released before it. Before, the cancelled call's activation stayed warm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_does_not_keep_its_lease_warm() {
    let w = World::new();
    let rt = w.runtime("a", RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    let o = oid("o");
    let token = |rt: &ObjectRuntime| {
        let o = o.clone();
        let rt = rt.clone();
        async move { rt.invoke(&o, async |t: &mut ObjectTxn<'_>| Ok::<_, Error>(t.token())).await.expect("token") }
    };
    let first = token(&rt).await;
    let second = token(&rt).await;
    assert!(second > first, "keep_warm 0: every call takes a new lease");
    let cancelled = tokio::time::timeout(
        Duration::from_millis(20),
        rt.invoke(&o, async |t: &mut ObjectTxn<'_>| {
            t.put("k", "v")?;
            futures::future::pending::<()>().await;
            Ok::<_, Error>(t.token())
        }),
    )
    .await;
    assert!(cancelled.is_err(), "the call was cancelled");
    let after = token(&rt).await;
    assert!(
        after.get() > second.get() + 1,
        "the cancelled call's lease was kept for the next call: {after} after {second}"
    );
    assert_eq!(get(&rt, &o, "k").await.expect("get"), None, "the cancelled call wrote nothing");
}

/// A call dropped by its caller after its handler ended, while it settles (here: its automatic
/// flush, waiting on a cold store that does not answer), where leases go back after every call
/// (`keep_warm` 0): its lease is not kept for the next call either, but released before it.
/// Before, the activation stayed in the slot with its lease: the next call reused it, and other
/// nodes met `LeaseHeld` until it expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cancelled_while_it_flushes_does_not_keep_its_lease_warm() {
    let w = World::new();
    let (cold, rt) =
        w.flaky_cold_runtime(RuntimeSettings { keep_warm: Duration::ZERO, flush_after_changes: 1, ..settings() });
    let o = oid("o");
    let token = |rt: &ObjectRuntime| {
        let o = o.clone();
        let rt = rt.clone();
        async move { rt.invoke(&o, async |t: &mut ObjectTxn<'_>| Ok::<_, Error>(t.token())).await.expect("token") }
    };
    let before = token(&rt).await;
    let flushing = Arc::new(tokio::sync::Notify::new());
    let signal = flushing.clone();
    *cold.before_append.lock() = Some(Box::pin(async move {
        signal.notify_one();
        futures::future::pending::<()>().await
    }));
    let call = rt.invoke(&o, async |t: &mut ObjectTxn<'_>| {
        t.put("k", "v")?;
        Ok::<_, Error>(t.token())
    });
    tokio::select! {
        r = call => panic!("the call ended although its flush never does: {r:?}"),
        () = flushing.notified() => {} // the call is dropped here, its flush waiting on cold
    }
    let after = token(&rt).await;
    assert!(
        after.get() > before.get() + 1,
        "the cancelled call's lease was kept for the next call: {after} after {before}"
    );
    assert_eq!(get(&rt, &o, "k").await.expect("get").as_deref(), Some(&b"v"[..]), "its commit stands");
}

/// An automatic flush whose cold commit never answers (a hung connection) is abandoned after
/// `auto_flush_timeout`: the durable call answers `Ok`, the flush counts as failed (pausing the
/// next automatic flushes), and the object's next call does not wait on cold storage. Before,
/// the call (and every later call of the object, queued on its slot) waited for as long as cold
/// storage hung, its lease renewed meanwhile. The change reaches cold once with a later flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_flush_that_hangs_is_abandoned_after_its_timeout() {
    let w = World::new();
    let settings = RuntimeSettings { flush_after_changes: 1, auto_flush_timeout: TTL * 3, ..settings() };
    let (cold, rt) = w.flaky_cold_runtime(settings);
    let o = oid("o");
    assert_eq!(incr(&rt, &o).await.expect("first, flushed"), 1);
    *cold.before_append.lock() = Some(Box::pin(futures::future::pending()));
    let ticking = tick(&w);
    let second = tokio::time::timeout(Duration::from_secs(20), incr(&rt, &o)).await;
    ticking.abort();
    assert_eq!(second.expect("the call ends although its flush hangs").expect("committed"), 2);
    assert_eq!(rt.metrics().flush_failures, 1);
    // The next automatic flush is paused: the next call commits without meeting cold storage.
    let third = tokio::time::timeout(Duration::from_secs(5), incr(&rt, &o)).await;
    assert_eq!(third.expect("the next call does not wait on cold storage").expect("committed"), 3);
    rt.flush_all().await.expect("flush");
    let changes = w.cold.read_changes(&o, 0, AsOf::Latest).await.expect("cold changes");
    assert_eq!(changes.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2, 3], "every change once");
}

/// A runtime on a [`FlakyGuard`] with `o` written once.
async fn flaky_guard_runtime(w: &World) -> (Arc<FlakyGuard>, ObjectRuntime, ObjectId) {
    let guard = Arc::new(FlakyGuard::new(w));
    let rt = w.runtime_with("a", guard.clone(), Arc::new(w.cold.clone()), settings());
    let o = oid("o");
    assert_eq!(incr(&rt, &o).await.expect("first"), 1);
    (guard, rt, o)
}

/// A call whose handler runs for half the TTL (so its lease is renewed meanwhile; the caller
/// ticks the clock), then puts `n` = `value`.
async fn long_call(w: &World, rt: &ObjectRuntime, o: &ObjectId, value: &'static str) -> Result<()> {
    rt.invoke(o, async |t: &mut ObjectTxn<'_>| {
        let stop = w.clock.now().plus(TTL / 2);
        while w.clock.now() < stop {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        t.put("n", value)
    })
    .await
}

/// An acquire whose outcome is unknown and that did land is this call's lease (the guard says
/// this node holds it): the call goes on, instead of failing and leaving a lease that refuses
/// this node's next acquires for a TTL.
#[tokio::test]
async fn an_acquire_with_an_unknown_outcome_that_landed_is_adopted() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(settings());
    guard.ambiguous_acquires.store(1, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(incr(&rt, &oid("o")).await.expect("the landed lease is used"), 1);
    assert_eq!(guard.ambiguous_acquires.load(std::sync::atomic::Ordering::SeqCst), 0, "the ambiguous acquire ran");
    assert_eq!(incr(&rt, &oid("o")).await.expect("and kept"), 2);
}

/// A cold commit that is still conflicting after the sink's attempts (retryable `Conflict`:
/// contention) fails the flush but leaves the activation and its lease alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_contention_does_not_end_the_activation() {
    let w = World::new();
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    let rt = flaky_runtime(&w, cold.clone());
    let o = oid("o");
    incr(&rt, &o).await.expect("incr");
    // More conflicts than the runtime's own retries of the append (which back off on the clock).
    cold.conflicts.store(6, std::sync::atomic::Ordering::SeqCst);
    let ticking = tick(&w);
    let e = rt.flush(&o).await.expect_err("contention");
    ticking.abort();
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(w.hot.current(&o).await.expect("current").is_some(), "still held");
    let activations = rt.metrics().activations;
    rt.flush(&o).await.expect("flushes next time");
    assert_eq!(rt.metrics().activations, activations, "not re-activated");
}

/// A cold commit the sink gave up on (a non-retryable `Conflict` that is not the runtime's own
/// "hot behind cold") fails the flush but leaves the activation and its lease alone: the object's
/// state is still current in hot storage, so nothing calls for a restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_commit_the_sink_gave_up_on_does_not_end_the_activation() {
    let w = World::new();
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    let rt = flaky_runtime(&w, cold.clone());
    let o = oid("o");
    incr(&rt, &o).await.expect("incr");
    cold.refusals.store(1, std::sync::atomic::Ordering::SeqCst);
    let e = rt.flush(&o).await.expect_err("refused");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(!e.is_retryable(), "the sink's own answer, unchanged: {e}");
    assert!(w.hot.current(&o).await.expect("current").is_some(), "still held");
    let activations = rt.metrics().activations;
    rt.flush(&o).await.expect("flushes next time");
    assert_eq!(rt.metrics().activations, activations, "not re-activated");
    assert_eq!(incr(&rt, &o).await.expect("incr"), 2);
    assert_eq!(rt.metrics().activations, activations, "still the same activation");
}

/// A call that ends during shutdown's wait keeps its lease until shutdown's flush, which drains
/// its object as a held one: also when the ring gives the object to another node (a node being
/// scaled down), which the flush of released objects would leave alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_ending_during_shutdowns_wait_is_drained() {
    let w = World::new();
    let rt = ring_runtime(&w, "a", "z");
    let o = oid("o");
    let (go_tx, handler) = paused_call(&rt, &o).await;
    let ticking = tick_by(&w, Duration::from_micros(200));
    let shutdown = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.shutdown().await })
    };
    // The call ends only once shutdown has begun (and waits for it).
    until("shutdown has begun", || shutting_down(&rt)).await;
    go_tx.send(()).expect("go");
    handler.await.expect("join").expect("call");
    let report = shutdown.await.expect("join").expect("shutdown");
    ticking.abort();
    assert_eq!((report.records, report.busy), (1, 0), "{report:?}");
    assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 1, "drained by shutdown");
    assert_eq!(w.hot.current(&o).await.expect("current"), None, "and released");
}

/// The runtime's local durations go by the clock's monotonic time, not its wall time: after the
/// wall clock is set back an hour, an object idle past `keep_warm` is given back by `maintain`
/// (it stayed warm for an hour more), and shutdown's wait for a call still running ends after
/// about one lease TTL (it waited an hour more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_waits_and_idleness_ignore_a_wall_clock_set_back() {
    let w = World::new();
    let clock = Arc::new(dotdo_core::testkit::SteppedClock::new(w.clock.clone()));
    let keep_warm = Duration::from_secs(3);
    let rt = ObjectRuntime::builder(NodeId::new("a").expect("node"))
        .with_hot_store(Arc::new(w.hot.clone()))
        .with_guard(Arc::new(w.hot.clone()))
        .with_cold_sink(Arc::new(w.cold.clone()))
        .with_clock(clock.clone())
        .with_settings(RuntimeSettings { keep_warm, ..settings() })
        .build()
        .expect("runtime");
    let o = oid("o");
    assert_eq!(incr(&rt, &o).await.expect("call"), 1);
    let hour = Duration::from_secs(3600);
    clock.set_back(hour);
    w.clock.advance(keep_warm + Duration::from_secs(1));
    rt.maintain().await.expect("maintain");
    assert_eq!(w.hot.current(&o).await.expect("current"), None, "idle past keep_warm: given back");

    let (go_tx, handler) = paused_call(&rt, &o).await;
    let shutdown = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.shutdown().await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    clock.set_back(2 * hour);
    let ticking = tick_by(&w, Duration::from_millis(100));
    let report = tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("shutdown's wait ends about one TTL later")
        .expect("join")
        .expect("shutdown");
    ticking.abort();
    assert_eq!(report.busy, 1, "{report:?}");
    go_tx.send(()).expect("go");
    let _ = handler.await.expect("join");
}

/// `flush_all` (and `shutdown`) on a runtime whose warm lease lapsed and cannot be taken again
/// (the guard's acquires stay of unknown outcome) fail, naming why, instead of answering `Ok`
/// with this runtime's acknowledged changes still in hot storage (with `drain_released` off,
/// the pass over released objects does not reach them). Once the guard answers, they drain.
#[tokio::test]
async fn flush_all_fails_if_a_lapsed_lease_cannot_be_taken_again() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(RuntimeSettings { drain_released: false, ..settings() });
    let o = oid("o");
    assert_eq!(incr(&rt, &o).await.expect("first"), 1);
    w.clock.advance(TTL + Duration::from_millis(1));
    guard.refused_ambiguous_acquires.store(4, std::sync::atomic::Ordering::SeqCst);
    let e = rt.flush_all().await.expect_err("the lapsed object's changes are not drained");
    assert!(e.is_retryable(), "{e}");
    assert!(w.hot.object_info(&o).await.expect("info").expect("o").has_pending_changes());
    let report = rt.shutdown().await.expect("the guard answers again: drained at shutdown");
    assert_eq!(report.records, 1, "{report:?}");
    assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 1);
}

/// A call admitted before shutdown that gets its object only once shutdown's flush has begun
/// (it waited for the slot behind a call that outlasted shutdown's wait) is refused with
/// `Shutdown`, nothing of it run: on the warm path it used to run and commit after the flush
/// had passed its object, and shutdown answered `Ok` with those changes left in hot storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_gets_its_object_during_shutdowns_flush_is_refused() {
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(settings());
    let (x, y) = (oid("x"), oid("y"));
    incr(&rt, &x).await.expect("x, to be drained");
    let (go_long, long) = paused_call(&rt, &y).await;
    let admitted = rt.metrics().invokes;
    let queued = {
        let (rt, y) = (rt.clone(), y.clone());
        tokio::spawn(async move { incr(&rt, &y).await })
    };
    until("the queued call is admitted", || async { rt.metrics().invokes > admitted }).await;
    assert!(!queued.is_finished(), "queued behind the long call");
    // Shutdown's flush of x pauses in its cold commit; meanwhile the long call ends and the
    // queued one gets y's slot.
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    *cold.before_append.lock() = Some(Box::pin(async move {
        entered_tx.send(()).expect("signal");
        g.notified().await
    }));
    let ticking = tick(&w);
    let shutdown = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.shutdown().await })
    };
    entered_rx.await.expect("shutdown's flush reached the cold commit");
    go_long.send(()).expect("go");
    long.await.expect("join").expect("the long call");
    let e = queued.await.expect("join").expect_err("refused");
    assert_eq!(e.kind(), &ErrorKind::Shutdown, "{e}");
    gate.notify_one();
    let report = shutdown.await.expect("join").expect("shutdown");
    ticking.abort();
    assert_eq!(report.busy, 1, "y was busy during the flush: {report:?}");
    assert_eq!(w.hot.get(&y, "n").await.expect("hot"), Some(Bytes::from("1")), "the refused call wrote nothing");
}

/// A refresh whose outcome is unknown (it applied; the reply was lost) is tried again like a
/// transient failure: the handler finishes, and neither the warm path nor `maintain` drops the
/// still-valid lease (dropped unreleased, it would refuse this node's own acquire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_with_an_unknown_outcome_keeps_the_lease() {
    let w = World::new();
    let (guard, rt, o) = flaky_guard_runtime(&w).await;
    // During a handler that outlives a third of the TTL: the renewal's first refresh is
    // ambiguous.
    guard.ambiguous_refreshes.store(1, std::sync::atomic::Ordering::SeqCst);
    let ticking = tick(&w);
    long_call(&w, &rt, &o, "2").await.expect("the handler is not self-fenced");
    ticking.abort();
    assert_eq!(guard.ambiguous_refreshes.load(std::sync::atomic::Ordering::SeqCst), 0, "the ambiguous refresh ran");
    // On the warm path and in maintain.
    w.clock.advance(TTL / 2);
    guard.ambiguous_refreshes.store(1, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(incr(&rt, &o).await.expect("warm path"), 3);
    // (The lease's expiry this node knows is the one before the ambiguous refresh: renew it.)
    rt.maintain().await.expect("maintain");
    w.clock.advance(TTL / 2);
    guard.ambiguous_refreshes.store(1, std::sync::atomic::Ordering::SeqCst);
    rt.maintain().await.expect("maintain");
    assert_eq!(guard.ambiguous_refreshes.load(std::sync::atomic::Ordering::SeqCst), 0, "maintain's refresh ran");
    assert_eq!(incr(&rt, &o).await.expect("after maintain"), 4);
    assert_eq!(rt.metrics().activations, 1, "never re-activated");
    assert_eq!(rt.metrics().self_fenced, 0);
}

/// A refresh failure that is neither transient nor a lost lease (a backend error) self-fences
/// the handler, and the lease is given back: the next call (here, at once) is not refused by
/// this node's own lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_renewal_gives_the_lease_back() {
    let w = World::new();
    let (guard, rt, o) = flaky_guard_runtime(&w).await;
    guard.broken_refreshes.store(1, std::sync::atomic::Ordering::SeqCst);
    let ticking = tick(&w);
    let e = long_call(&w, &rt, &o, "99").await.expect_err("self-fenced");
    ticking.abort();
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    assert_eq!(w.hot.current(&o).await.expect("current"), None, "given back");
    let other = w.runtime("b", settings());
    assert_eq!(incr(&other, &o).await.expect("another node at once"), 2, "nothing of the failed call written");
}

/// A cold sink whose snapshots in `expired` are gone (as after `expire_snapshots`): reads as of
/// them are `NotFound` and they are no longer listed.
#[derive(Debug)]
struct ExpiringCold {
    inner: MemoryColdStore,
    expired: parking_lot::Mutex<std::collections::HashSet<SnapshotId>>,
    /// Every snapshot read is `NotFound` (each expires before it can be read), while
    /// `snapshots` still lists them.
    all_expired: std::sync::atomic::AtomicBool,
    /// `snapshots` answers without the newest snapshot left (a catalog replica lagging behind).
    lagging_snapshots: std::sync::atomic::AtomicBool,
    /// The next lookup first commits this batch (another object's flush) and expires the
    /// snapshot it was asked at (maintenance between an activation's pin and its preload).
    moved_before_lookup: parking_lot::Mutex<Option<ColdBatch>>,
}

impl ExpiringCold {
    fn new(inner: MemoryColdStore) -> Self {
        ExpiringCold {
            inner,
            expired: Default::default(),
            all_expired: Default::default(),
            lagging_snapshots: Default::default(),
            moved_before_lookup: Default::default(),
        }
    }

    fn check(&self, as_of: AsOf) -> Result<()> {
        let all = self.all_expired.load(std::sync::atomic::Ordering::SeqCst);
        match as_of {
            AsOf::Snapshot(id) if all || self.expired.lock().contains(&id) => {
                Err(Error::new(ErrorKind::NotFound, format!("snapshot {id} expired (test)")))
            }
            _ => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl ColdSink for ExpiringCold {
    async fn append(&self, batch: ColdBatch) -> Result<ColdCommit> {
        self.inner.append(batch).await
    }
    async fn watermark(&self, object: &ObjectId) -> Result<Watermark> {
        self.inner.watermark(object).await
    }
    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let expired = self.expired.lock().clone();
        let mut left: Vec<SnapshotInfo> =
            self.inner.snapshots().await?.into_iter().filter(|s| !expired.contains(&s.id)).collect();
        if self.lagging_snapshots.load(std::sync::atomic::Ordering::SeqCst) {
            left.pop();
        }
        Ok(left)
    }
    async fn load_state(&self, object: &ObjectId, as_of: AsOf) -> Result<ColdState> {
        self.check(as_of)?;
        self.inner.load_state(object, as_of).await
    }
    async fn read_changes(&self, object: &ObjectId, after: Seq, as_of: AsOf) -> Result<Vec<ChangeRecord>> {
        self.check(as_of)?;
        self.inner.read_changes(object, after, as_of).await
    }
}

#[async_trait::async_trait]
impl dotdo_core::IndexAccelerator for ExpiringCold {
    async fn lookup(&self, object: &ObjectId, key: &str, as_of: AsOf) -> Result<dotdo_core::Lookup> {
        let moved = self.moved_before_lookup.lock().take();
        if let Some(batch) = moved {
            self.inner.append(batch).await?;
            if let AsOf::Snapshot(id) = as_of {
                self.expired.lock().insert(id);
            }
        }
        self.check(as_of)?;
        self.inner.lookup(object, key, as_of).await
    }
    async fn scan(&self, query: dotdo_core::ScanQuery) -> Result<dotdo_core::Scan> {
        self.check(query.as_of)?;
        self.inner.scan(query).await
    }
}

/// A lazily restored object read key by key through the accelerator keeps at most
/// `lazy_cache_bytes` cached: past it the least recently used go, and keys read again come from cold
/// storage with the same answers (a read-only object probed with ever new keys grew it without
/// end). With the default budget every second read is a hit.
#[tokio::test]
async fn the_lazy_cache_is_bounded() {
    let w = World::new();
    let a = w.runtime("a", settings());
    let o = oid("o");
    populate(&a, &o, 100).await;
    a.evict(&o).await.expect("evict");
    a.shutdown().await.expect("shutdown");
    for (budget, bounded) in [(2_000usize, true), (RuntimeSettings::default().lazy_cache_bytes, false)] {
        let b = w.runtime("b", RuntimeSettings { restore: RestoreMode::Lazy, lazy_cache_bytes: budget, ..settings() });
        let read_all = || async {
            for i in 0..100 {
                let v = get(&b, &o, &format!("key/{i:04}")).await.expect("lazy read");
                assert_eq!(v, Some(Bytes::from(format!("value-{i}"))), "key {i}");
            }
            assert_eq!(get(&b, &o, "never").await.expect("absent"), None);
        };
        read_all().await;
        let misses = b.metrics().lazy_cache_misses;
        read_all().await;
        let again = b.metrics().lazy_cache_misses - misses;
        if bounded {
            // About 20 entries fit: at most that many of the second pass's reads are hits.
            assert!(again >= 80, "the cache kept more than its budget: only {again} misses of 101");
        } else {
            assert_eq!(again, 0, "every key is cached under the default budget");
        }
        assert!(matches!(b.metrics().recent_activations.back().map(|m| m.recovery), Some(Recovery::Lazy)));
        b.shutdown().await.expect("shutdown");
    }
    // Keys the caller preloaded stay cached past the budget.
    let restore = RestoreMode::Hybrid { keys: vec!["key/0000".into()], prefixes: vec!["key/009".into()] };
    let b = w.runtime("b", RuntimeSettings { restore, lazy_cache_bytes: 2_000, ..settings() });
    for i in 0..100 {
        get(&b, &o, &format!("key/{i:04}")).await.expect("lazy read");
    }
    let misses = b.metrics().lazy_cache_misses;
    for key in ["key/0000", "key/0095", "key/0099"] {
        assert!(get(&b, &o, key).await.expect("read").is_some(), "{key}");
    }
    assert_eq!(b.metrics().lazy_cache_misses, misses, "the preloaded keys were kept");
    assert_eq!(b.metrics().preloaded_keys, 11);
}

/// Past its budget the lazy cache drops the least recently used entries, down to half the
/// budget: a key read between every two others stays cached, and so do the newest reads (the
/// cache used to start over, dropping every entry, the busiest key too).
#[tokio::test]
async fn the_lazy_cache_drops_the_least_recently_used() {
    let w = World::new();
    let a = w.runtime("a", settings());
    let o = oid("o");
    populate(&a, &o, 100).await;
    a.evict(&o).await.expect("evict");
    a.shutdown().await.expect("shutdown");
    let b = w.runtime("b", RuntimeSettings { restore: RestoreMode::Lazy, lazy_cache_bytes: 2_000, ..settings() });
    let (b, o) = (&b, &o);
    let read = |i: usize| async move {
        let v = get(b, o, &format!("key/{i:04}")).await.expect("lazy read");
        assert_eq!(v, Some(Bytes::from(format!("value-{i}"))), "key {i}");
    };
    read(0).await;
    for i in 1..100 {
        read(i).await;
        read(0).await;
    }
    // About 22 entries fit: the budget was passed several times over, each key read cold once.
    let m = b.metrics();
    assert_eq!(m.lazy_cache_misses, 100, "only first reads miss: the busiest key stayed cached");
    assert_eq!(m.lazy_cache_hits, 99);
    for i in 95..100 {
        read(i).await;
    }
    assert_eq!(b.metrics().lazy_cache_misses, 100, "the newest reads stay cached past the budget");
    read(1).await;
    assert_eq!(b.metrics().lazy_cache_misses, 101, "the oldest read was dropped");
    b.shutdown().await.expect("shutdown");
}

/// A prefetch of a lazily restored object whose snapshot maintenance expired re-pins like a
/// read does (it used to fail with `NotFound` until some read re-pinned), through the
/// accelerator's lookups and scans alike.
#[tokio::test]
async fn a_prefetch_after_the_expiry_of_a_lazy_snapshot_repins() {
    let w = World::new();
    let a = w.runtime("a", settings());
    let (o, p) = (oid("o"), oid("p"));
    populate(&a, &o, 20).await;
    a.evict(&o).await.expect("evict");
    let cold = Arc::new(ExpiringCold::new(w.cold.clone()));
    let b = w.lazy_runtime_reading("b", cold.clone(), cold.clone());
    assert_eq!(get(&b, &o, "key/0003").await.expect("lazy read").as_deref(), Some(&b"value-3"[..]));
    let pinned = b.metrics().recent_activations.back().and_then(|m| m.snapshot).expect("pinned snapshot");
    incr(&a, &p).await.expect("other object");
    a.flush(&p).await.expect("flush other");
    cold.expired.lock().insert(pinned);
    b.prefetch(&o, &["key/0001".into()], &["key/001".into()]).await.expect("prefetch after expiry");
    assert_eq!(b.metrics().preloaded_keys, 11, "key/0001 and key/0010..=key/0019");
    assert_eq!(get(&b, &o, "key/0015").await.expect("preloaded").as_deref(), Some(&b"value-15"[..]));
}

/// A hybrid activation whose pinned snapshot expires before its preload reads it re-pins, and
/// its activation metrics name the snapshot reads are served at (they named the expired one).
#[tokio::test]
async fn a_hybrid_activation_reports_the_snapshot_its_preload_repinned_to() {
    let w = World::new();
    let a = w.runtime("a", settings());
    let (o, p) = (oid("o"), oid("p"));
    populate(&a, &o, 5).await;
    a.evict(&o).await.expect("evict");
    a.shutdown().await.expect("shutdown");
    let cold = Arc::new(ExpiringCold::new(w.cold.clone()));
    let restore = RestoreMode::Hybrid { keys: vec!["key/0001".into()], prefixes: vec![] };
    let b = w.runtime_restoring("b", cold.clone(), cold.clone(), restore);
    let first = w.cold.snapshots().await.expect("snapshots").last().map(|s| s.id).expect("a snapshot");
    let other = dotdo_core::ChangeRecord {
        object: p.clone(),
        seq: 1,
        token: FencingToken::new(1),
        type_name: "T".into(),
        key: "k".into(),
        op: dotdo_core::Op::Put,
        value: Bytes::from("v"),
        timestamp: Timestamp::from_micros(1),
    };
    *cold.moved_before_lookup.lock() = Some(ColdBatch::single(p.clone(), FencingToken::new(1), vec![other]));
    assert_eq!(get(&b, &o, "key/0001").await.expect("preloaded").as_deref(), Some(&b"value-1"[..]));
    assert!(cold.moved_before_lookup.lock().is_none(), "the preload's lookup moved the table on");
    let newest = w.cold.snapshots().await.expect("snapshots").last().map(|s| s.id).expect("a snapshot");
    assert_ne!(newest, first);
    let m = b.metrics().recent_activations.back().cloned().expect("an activation");
    assert_eq!(m.recovery, Recovery::Hybrid);
    assert_eq!(m.snapshot, Some(newest), "the snapshot reads are served at, not the expired {first}");
}

/// How runtime "b" of [`lazily_read_then_cold_moves_on`] reads cold storage.
#[derive(Clone, Copy, PartialEq)]
enum LazyView {
    /// Its cold sink has no accelerator: the whole state is cached at the first read.
    NoAccelerator,
    /// Key by key through an accelerator that is also its cold sink; both see the expiry.
    Accelerator,
    /// Key by key through an accelerator that sees the expiry, while its cold sink (the world's
    /// cold store) still loads the expired snapshot.
    OnlyTheAcceleratorExpires,
}

/// Object `o` (`n` = 3, written by runtime "a", evicted) read lazily by runtime "b" (see
/// [`LazyView`]), then its cold state moves on (a writer outside "b": `n` = 10) and the
/// snapshot "b" pinned expires.
async fn lazily_read_then_cold_moves_on(view: LazyView) -> (ObjectRuntime, ObjectId, World) {
    let w = World::new();
    let a = w.runtime("a", settings());
    let (o, p) = (oid("o"), oid("p"));
    for _ in 0..3 {
        incr(&a, &o).await.expect("incr");
    }
    a.evict(&o).await.expect("evict");
    let cold = Arc::new(ExpiringCold::new(w.cold.clone()));
    let b = if view != LazyView::NoAccelerator {
        let sink: Arc<dyn ColdSink> =
            if view == LazyView::Accelerator { cold.clone() } else { Arc::new(w.cold.clone()) };
        w.lazy_runtime_reading("b", sink, cold.clone())
    } else {
        w.lazy_runtime_without_accelerator("b", cold.clone())
    };
    assert_eq!(get(&b, &o, "n").await.expect("lazy read"), Some(Bytes::from("3")));
    let pinned = b.metrics().recent_activations.back().and_then(|m| m.snapshot).expect("pinned snapshot");
    let mut next = w.cold.read_changes(&o, 0, AsOf::Latest).await.expect("changes").pop().expect("last");
    next.seq += 1;
    next.value = Bytes::from("10");
    w.cold.append(ColdBatch::single(o.clone(), next.token, vec![next])).await.expect("cold moves on");
    incr(&a, &p).await.expect("other object");
    a.flush(&p).await.expect("flush other");
    cold.expired.lock().insert(pinned);
    (b, o, w)
}

/// A call on `o` whose handler first reads a key it has not cached, finding that the cold state
/// moved on (a `Conflict` it swallows), then goes on with `then`: the call's error (it must
/// fail: what it made rests on the old state).
async fn a_call_that_swallows_the_move<T>(
    b: &ObjectRuntime,
    o: &ObjectId,
    then: impl AsyncFnOnce(&mut ObjectTxn<'_>) -> Result<T>,
) -> Error {
    let r = b
        .invoke(o, async move |t: &mut ObjectTxn<'_>| {
            let missed = t.get("not-cached").await;
            assert!(missed.is_err_and(|e| e.kind() == &ErrorKind::Conflict), "the read finds the move");
            then(t).await
        })
        .await;
    r.err().expect("the call rests on moved state")
}

/// A lazy activation that finds, re-pinning an expired snapshot, that its object's cold state
/// moved on (another writer appended to cold meanwhile) answers a retryable `Conflict`, and the
/// next call activates afresh from the new cold state (it kept answering `Conflict` for as long
/// as calls kept the activation warm).
#[tokio::test]
async fn a_lazy_activation_whose_cold_state_moved_starts_afresh() {
    let (b, o, _w) = lazily_read_then_cold_moves_on(LazyView::NoAccelerator).await;
    let e = incr(&b, &o).await.expect_err("the restore cannot complete");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(e.is_retryable(), "{e}");
    assert_eq!(incr(&b, &o).await.expect("activated afresh"), 11);
    assert_eq!(get(&b, &o, "n").await.expect("read"), Some(Bytes::from("11")));
}

/// A read-only handler on a lazy activation (key by key through the accelerator) that swallows
/// the `Conflict` of a read which found the object's cold state moved on, and answers from what
/// it had cached, is refused: that answer rests on the old state (it was `Ok`).
#[tokio::test]
async fn a_read_only_answer_after_the_cold_state_moved_is_refused() {
    let (b, o, w) = lazily_read_then_cold_moves_on(LazyView::Accelerator).await;
    let e = a_call_that_swallows_the_move(&b, &o, async |t: &mut ObjectTxn<'_>| t.get("n").await).await;
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(e.is_retryable(), "{e}");
    assert!(w.hot.is_available(&o).await.expect("available"), "the spent activation's lease went back");
    assert_eq!(get(&b, &o, "n").await.expect("activated afresh"), Some(Bytes::from("10")));
}

/// A handler on a lazy activation that swallows the `Conflict` of a read which found the
/// object's cold state moved on and answers with an error of its own (computed from what it had
/// cached) is refused like an answer: its error rests on the old state too (it was passed on,
/// and the spent activation kept its lease).
#[tokio::test]
async fn a_handler_error_after_the_cold_state_moved_is_refused() {
    let (b, o, w) = lazily_read_then_cold_moves_on(LazyView::Accelerator).await;
    let e = a_call_that_swallows_the_move(&b, &o, async |t: &mut ObjectTxn<'_>| {
        let n = t.get("n").await?;
        Err::<(), _>(Error::invalid(format!("over the limit at {n:?}")))
    })
    .await;
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(w.hot.is_available(&o).await.expect("available"), "the spent activation's lease went back");
    assert_eq!(get(&b, &o, "n").await.expect("activated afresh"), Some(Bytes::from("10")));
}

/// A write on a lazy activation whose restore finds the cold state moved on fails with
/// `Conflict` and gives the spent activation's lease back at once (it was kept until the next
/// call or `maintain`).
#[tokio::test]
async fn a_write_that_finds_the_cold_state_moved_gives_the_lease_back() {
    let (b, o, w) = lazily_read_then_cold_moves_on(LazyView::NoAccelerator).await;
    let e = incr(&b, &o).await.expect_err("the restore cannot complete");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(w.hot.is_available(&o).await.expect("available"), "the spent activation's lease went back");
}

/// `complete_restores` and `prefetch` on a lazy activation whose restore finds the cold state
/// moved on fail with `Conflict` and give the spent activation's lease back, as a call does: it
/// was kept (renewed by `maintain` for `keep_warm`), so other nodes met `LeaseHeld`.
#[tokio::test]
async fn restores_outside_calls_that_find_the_cold_state_moved_give_the_lease_back() {
    for prefetch in [false, true] {
        // Without an accelerator the first read loaded the whole state: nothing for a preload
        // to read.
        let view = if prefetch { LazyView::Accelerator } else { LazyView::NoAccelerator };
        let (b, o, w) = lazily_read_then_cold_moves_on(view).await;
        let e = if prefetch {
            b.prefetch(&o, &[], &["".to_string()]).await.expect_err("the preload cannot read the old snapshot")
        } else {
            b.complete_restores().await.expect_err("the restore cannot complete")
        };
        assert_eq!(e.kind(), &ErrorKind::Conflict, "prefetch {prefetch}: {e}");
        assert!(w.hot.is_available(&o).await.expect("available"), "prefetch {prefetch}: the lease went back");
        assert_eq!(get(&b, &o, "n").await.expect("the next call activates afresh"), Some(Bytes::from("10")));
    }
}

/// A lazy object whose every pinned snapshot expires before it can be read (a table expiring
/// aggressively) gives up after a few re-pins with a retryable `Unavailable`: it answered
/// `NotFound` after one re-pin, which says "no such object" for one that exists.
#[tokio::test]
async fn a_lazy_read_whose_snapshots_keep_expiring_is_unavailable_not_not_found() {
    let w = World::new();
    let a = w.runtime("a", settings());
    let o = oid("o");
    populate(&a, &o, 5).await;
    a.evict(&o).await.expect("evict");
    let cold = Arc::new(ExpiringCold::new(w.cold.clone()));
    cold.all_expired.store(true, std::sync::atomic::Ordering::SeqCst);
    let b = w.lazy_runtime_without_accelerator("b", cold.clone());
    let e = get(&b, &o, "key/0001").await.expect_err("every pinned snapshot expired");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable(), "{e}");
    cold.all_expired.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(get(&b, &o, "key/0001").await.expect("once they stay").as_deref(), Some(&b"value-1"[..]));
}

/// A write on a lazy activation that a read found moved on (its accelerator's snapshot expired
/// and re-pinning found newer cold state; the handler swallowed that `Conflict`) is refused, also
/// when the cold sink still loads the old snapshot: the restore before the commit installed the
/// old state and the write went on top of it, over the newer value in cold.
#[tokio::test]
async fn a_write_after_a_read_found_the_cold_state_moved_is_refused() {
    let (b, o, _w) = lazily_read_then_cold_moves_on(LazyView::OnlyTheAcceleratorExpires).await;
    let e = a_call_that_swallows_the_move(&b, &o, async |t: &mut ObjectTxn<'_>| t.put("n", "4")).await;
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert_eq!(get(&b, &o, "n").await.expect("activated afresh"), Some(Bytes::from("10")));
}

/// A lazily restored object keeps working after maintenance expired the snapshot it was
/// reading: it re-pins the newest snapshot (its own cold state has not moved) instead of failing
/// every read and write with `NotFound`.
#[tokio::test]
async fn a_lazy_object_survives_the_expiry_of_its_snapshot() {
    let w = World::new();
    let a = w.runtime("a", RuntimeSettings { restore: RestoreMode::Lazy, ..settings() });
    let (o, p) = (oid("o"), oid("p"));
    populate(&a, &o, 20).await;
    let before = all_state(&a, &o).await;
    a.evict(&o).await.expect("evict");
    let cold = Arc::new(ExpiringCold::new(w.cold.clone()));
    let b = w.lazy_runtime_without_accelerator("b", cold.clone());
    assert_eq!(get(&b, &o, "key/0003").await.expect("lazy read").as_deref(), Some(&b"value-3"[..]));
    let pinned = b.metrics().recent_activations.back().and_then(|m| m.snapshot).expect("pinned snapshot");
    // Other objects move the table on; maintenance expires the snapshot `o` reads.
    incr(&a, &p).await.expect("other object");
    a.flush(&p).await.expect("flush other");
    cold.expired.lock().insert(pinned);
    // Its whole state is cached already (no accelerator): a prefetch reads nothing, the expired
    // snapshot included.
    b.prefetch(&o, &["key/0001".into()], &[]).await.expect("prefetch after expiry");
    assert_eq!(get(&b, &o, "key/0007").await.expect("read after expiry").as_deref(), Some(&b"value-7"[..]));
    assert_eq!(get(&b, &o, "gone").await.expect("deleted stays deleted"), None);
    assert_eq!(incr(&b, &o).await.expect("write completes the restore"), 1);
    let mut after = all_state(&b, &o).await;
    after.retain(|(k, _)| k != "n");
    assert_eq!(after, before);
}

/// An object of 20 keys written by runtime "a" and evicted to cold, then read once by a lazily
/// restoring runtime "b" whose cold sink is a [`FlakyCold`] (the accelerator is the world's
/// cold store): b's activation is lazy. Returns the sink, b, the object and its whole state.
async fn lazily_restored(w: &World) -> (Arc<FlakyCold>, ObjectRuntime, ObjectId, Vec<(String, Bytes)>) {
    let a = w.runtime("a", settings());
    let o = oid("o");
    populate(&a, &o, 20).await;
    a.evict(&o).await.expect("evict");
    let before = all_state(&a, &o).await;
    a.evict(&o).await.expect("evict again");
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    let b = w.lazy_runtime("b", cold.clone());
    assert_eq!(get(&b, &o, "key/0003").await.expect("lazy read").as_deref(), Some(&b"value-3"[..]));
    (cold, b, o, before)
}

/// Evicting a lazily restored object (its state is in cold already) does not load that state
/// into hot storage only to drop it: no read of the whole cold state, and the object comes back
/// whole afterwards.
#[tokio::test]
async fn evicting_a_lazy_object_does_not_load_its_cold_state() {
    let w = World::new();
    let (cold, b, o, before) = lazily_restored(&w).await;
    b.evict(&o).await.expect("evict the lazy object");
    assert_eq!(cold.loads.load(std::sync::atomic::Ordering::SeqCst), 0, "no read of the whole cold state");
    assert_eq!(b.metrics().evictions, 1);
    assert_eq!(w.hot.object_info(&o).await.expect("info").map_or(0, |i| i.keys), 0, "nothing in hot storage");
    assert_eq!(all_state(&b, &o).await, before, "and it comes back whole");
}

/// The first commit on a lazily restored object loads its whole state into hot storage first;
/// the lease is renewed meanwhile, as during the handler: a load that outlasts the lease (here
/// two TTLs) no longer fails the call with `LeaseLost`.
#[tokio::test]
async fn a_slow_restore_before_a_lazy_objects_first_commit_keeps_the_lease() {
    let w = World::new();
    let (cold, b, o, _) = lazily_restored(&w).await;
    *cold.before_load.lock() = Some(clock_moves_on(&w.clock, 20));
    assert_eq!(incr(&b, &o).await.expect("the first write completes the restore"), 1);
    assert_eq!(cold.loads.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(b.metrics().self_fenced, 0);
    assert_eq!(all_state(&b, &o).await.len(), 21);
}

/// An activation whose check of pending hot changes against cold outlasts the lease (here two
/// TTLs; a crash between a large commit and its truncation leaves much to compare) renews the
/// lease meanwhile, and the call succeeds. Unrenewed, the activation ended on a lease already
/// run out, the call failed, and every later activation ran the same check: the object was
/// stuck.
#[tokio::test]
async fn a_slow_check_of_pending_changes_against_cold_keeps_the_lease() {
    let w = World::new();
    let o = oid("o");
    // A holder's change reached cold, and its truncation in hot never happened.
    let lease = w.hot.acquire(&o, &NodeId::new("x").expect("node"), TTL).await.expect("acquire");
    w.hot.put(&o, lease.token, "T", "n", "1".into()).await.expect("put");
    let changes = w.hot.read_changes(&o, 0, 100).await.expect("changes");
    w.cold.append(ColdBatch::single(o.clone(), lease.token, changes)).await.expect("commit");
    w.hot.release(&lease).await.expect("release");
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    *cold.before_read_changes.lock() = Some(clock_moves_on(&w.clock, 20));
    let b = w.runtime_with("b", Arc::new(w.hot.clone()), cold.clone(), settings());
    assert_eq!(incr(&b, &o).await.expect("activated past the slow check"), 2);
    assert_eq!(b.metrics().self_fenced, 0);
}

/// `flush_all`'s check of records cold skipped as replays (here one object's change that
/// reached cold before a crash kept it from being truncated) reads them back from hot and cold;
/// a slow read (two TTLs) keeps the held leases renewed, as the commits do, and the flush drains
/// every object. (The check ran with no renewal: the leases ran out, and the flush failed with
/// the other object's changes left in hot.)
#[tokio::test]
async fn a_slow_check_of_replays_in_flush_all_keeps_the_leases() {
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(RuntimeSettings { flush_batch_records: 2, ..settings() });
    let (x, y) = (oid("x"), oid("y"));
    incr(&rt, &x).await.expect("x");
    let token = w.hot.current(&x).await.expect("current").expect("held").token;
    let changes = w.hot.read_changes(&x, 0, 100).await.expect("changes");
    w.cold.append(ColdBatch::single(x.clone(), token, changes)).await.expect("x's change reached cold");
    for _ in 0..3 {
        incr(&rt, &y).await.expect("y");
    }
    *cold.before_read_changes.lock() = Some(clock_moves_on(&w.clock, 20));
    rt.flush_all().await.expect("every object drained");
    assert_eq!(w.cold.watermark(&y).await.expect("wm").through, 3);
    for o in [&x, &y] {
        let info = w.hot.object_info(o).await.expect("info").expect("object");
        assert!(!info.has_pending_changes(), "{o}: {info:?}");
    }
}

/// Nothing of `objects` waits in hot storage to be drained.
async fn assert_nothing_pending(w: &World, objects: &[&ObjectId]) {
    for o in objects {
        let info = w.hot.object_info(o).await.expect("info").expect("object");
        assert!(!info.has_pending_changes(), "{o}: {info:?}");
    }
}

/// `y`'s change reached cold under another holder, whose truncation in hot never happened;
/// the lease is given back.
async fn committed_not_truncated(w: &World, y: &ObjectId) {
    let lease = w.hot.acquire(y, &NodeId::new("other").expect("node"), TTL).await.expect("acquire");
    w.hot.put(y, lease.token, "T", "n", "1".into()).await.expect("put");
    let changes = w.hot.read_changes(y, 0, 100).await.expect("changes");
    w.cold.append(ColdBatch::single(y.clone(), lease.token, changes)).await.expect("y's change reached cold");
    w.hot.release(&lease).await.expect("release");
}

/// `flush_all` taking an object it does not hold (changes another holder left in hot) checks
/// them against cold as it activates it; a slow check (two TTLs) keeps the held objects' leases
/// renewed meanwhile. (Unrenewed, the held object's lease ran out and the flush failed with its
/// changes left in hot.)
#[tokio::test]
async fn a_slow_activation_in_flush_all_keeps_the_held_leases() {
    let w = World::new();
    let (x, y) = (oid("x"), oid("y"));
    committed_not_truncated(&w, &y).await;
    let (cold, rt) = w.flaky_cold_runtime(settings());
    incr(&rt, &x).await.expect("x");
    *cold.before_read_changes.lock() = Some(clock_moves_on(&w.clock, 20));
    rt.flush_all().await.expect("every object drained");
    assert!(cold.before_read_changes.lock().is_none(), "the slow read ran");
    assert_nothing_pending(&w, &[&x, &y]).await;
    assert_eq!(w.cold.watermark(&x).await.expect("wm").through, 1);
}

/// `flush_all` compares an object activated while cold storage was unreachable with cold
/// before draining it; a slow comparison (two TTLs) keeps the other held objects' leases
/// renewed meanwhile (unrenewed, they ran out and the flush failed with their changes in hot).
#[tokio::test]
async fn a_slow_check_of_an_unverified_activation_in_flush_all_keeps_the_other_leases() {
    let w = World::new();
    let (x, y) = (oid("x"), oid("y"));
    committed_not_truncated(&w, &y).await;
    let (cold, rt) = w.flaky_cold_runtime(settings());
    cold.down.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(incr(&rt, &y).await.expect("activated with cold down"), 2);
    cold.down.store(false, std::sync::atomic::Ordering::SeqCst);
    incr(&rt, &x).await.expect("x");
    *cold.before_read_changes.lock() = Some(clock_moves_on(&w.clock, 20));
    rt.flush_all().await.expect("every object drained");
    assert!(cold.before_read_changes.lock().is_none(), "the slow read ran");
    assert_nothing_pending(&w, &[&x, &y]).await;
    assert_eq!(w.cold.watermark(&y).await.expect("wm").through, 2);
}

/// A slow cold read or commit: the world's clock moves on by `tenths` tenths of a TTL, a tenth at
/// a time with a real millisecond between, so the runtime's renewal task gets to run.
fn clock_moves_on(clock: &dotdo_core::ManualClock, tenths: u32) -> futures::future::BoxFuture<'static, ()> {
    let clock = clock.clone();
    Box::pin(async move {
        for _ in 0..tenths {
            clock.advance(TTL / 10);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

/// `maintain` reads the time for each lease it renews: behind a slow guard (a refresh takes a
/// quarter of a TTL), a lease not yet due when the round began but due by the time the round gets to it is
/// renewed. With the time read once per round it looked fresher than it was and was left to
/// run out before the next round.
#[tokio::test]
async fn maintain_judges_each_lease_by_the_time_it_gets_to_it() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(settings());
    incr(&rt, &oid("a")).await.expect("a");
    w.clock.advance(TTL / 10);
    incr(&rt, &oid("b")).await.expect("b");
    // a has 0.64 TTL left (due: at most two thirds), b 0.74 (not yet); a is renewed first (in id
    // order), which takes a quarter of a TTL: b then has 0.49 left, and is due.
    w.clock.advance(TTL * 36 / 100 - TTL / 10);
    let expiry = async |o: &str| w.hot.current(&oid(o)).await.expect("current").expect("held").expires_at;
    let before = [expiry("a").await, expiry("b").await];
    *guard.slow_refreshes.lock() = Some((w.clock.clone(), TTL / 4));
    rt.maintain().await.expect("maintain");
    for (o, was) in ["a", "b"].into_iter().zip(before) {
        assert!(expiry(o).await > was, "{o} was not renewed");
    }
}

/// A hot store answering each `read_changes` with a few changes (the SQL stores stop at 8 MiB of
/// values) still drains into commits as large as `flush_batch_records`/`flush_batch_bytes`
/// allow: the drain reads on. It committed each answer on its own, up to 12 times more
/// snapshots and files for a backlog of small values.
#[tokio::test]
async fn a_drain_reads_on_past_short_answers_to_fill_its_commit() {
    for flush_all in [false, true] {
        let w = World::new();
        let hot = Arc::new(FaultyHot::new(w.hot.clone()));
        let rt = w.runtime_with_hot("a", hot.clone(), settings());
        for o in ["o0", "o1"] {
            for _ in 0..10 {
                incr(&rt, &oid(o)).await.expect("incr");
            }
        }
        hot.changes_per_read.store(3, std::sync::atomic::Ordering::SeqCst);
        let (commits, records) = if flush_all {
            let r = rt.flush_all().await.expect("flush_all");
            (r.commits, r.records)
        } else {
            let (a, b) = (rt.flush(&oid("o0")).await.expect("flush"), rt.flush(&oid("o1")).await.expect("flush"));
            (a.commits + b.commits, a.records + b.records)
        };
        assert_eq!((commits, records), (if flush_all { 1 } else { 2 }, 20), "flush_all {flush_all}");
    }
}

/// A cold state the hot store refuses to restore (a sink that broke its contract: a value over
/// the size limit, a key twice) is `Corrupt` naming the object, whatever the refusal's kind: a
/// value over the limit was passed on as `LimitExceeded`, which tells the caller its own input
/// was too large.
#[tokio::test]
async fn a_cold_state_the_hot_store_cannot_restore_is_corrupt() {
    for (what, entry) in [
        (
            "a value over the limit",
            Entry { key: "big".into(), value: Bytes::from(vec![0; MAX_VALUE_BYTES + 1]), seq: 1 },
        ),
        ("a key twice", Entry { key: "key/0001".into(), value: Bytes::from("again"), seq: 1 }),
    ] {
        let w = World::new();
        let a = w.runtime("a", settings());
        let o = oid("o");
        populate(&a, &o, 3).await;
        a.evict(&o).await.expect("evict");
        let cold = Arc::new(FlakyCold::new(w.cold.clone()));
        *cold.extra_entry.lock() = Some(entry);
        let b = w.runtime_with("b", Arc::new(w.hot.clone()), cold, settings());
        let e = incr(&b, &o).await.expect_err(what);
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{what}: {e}");
        assert!(e.to_string().contains("cold state of o cannot be restored"), "{what}: {e}");
    }
}

/// A drain that cold refuses because it no longer has the changes the hot store truncated once
/// cold acknowledged them (it lost data, or this runtime uses another table) is `Corrupt`
/// saying so, for `flush` and `flush_all`: it was the sink's `InvalidInput` ("fix the input"),
/// though no input can fix it.
#[tokio::test]
async fn a_drain_into_a_cold_store_without_the_acknowledged_changes_is_corrupt() {
    for flush_all in [false, true] {
        let w = World::new();
        let a = w.runtime("a", RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
        let o = oid("o");
        for _ in 0..3 {
            incr(&a, &o).await.expect("incr");
        }
        a.flush(&o).await.expect("flush");
        let other_cold = Arc::new(MemoryColdStore::with_clock(Arc::new(w.clock.clone())));
        let b = w.runtime_with("b", Arc::new(w.hot.clone()), other_cold, settings());
        assert_eq!(incr(&b, &o).await.expect("the hot state serves"), 4);
        let e =
            if flush_all { b.flush_all().await.expect_err("flush_all") } else { b.flush(&o).await.expect_err("flush") };
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "flush_all {flush_all}: {e}");
        assert!(e.to_string().contains("only through seq 0") && e.to_string().contains("seq 4"), "{e}");
    }
}

/// A drain that outlasts the lease (here one cold commit taking two TTLs; a large backlog after
/// a cold outage) keeps the lease renewed, as a handler does: flush, evict and the automatic
/// flush after a commit each end holding a live lease (evict then gives it back). They ran
/// without renewal: another node could take the object over meanwhile, and the drain then
/// failed fenced after its commits had landed.
#[tokio::test]
async fn a_drain_that_outlasts_the_lease_keeps_it() {
    use std::sync::atomic::Ordering;
    for how in ["flush", "evict", "auto-flush"] {
        let w = World::new();
        let auto = if how == "auto-flush" { 2 } else { 0 };
        let (cold, rt) = w.flaky_cold_runtime(RuntimeSettings { flush_after_changes: auto, ..settings() });
        let o = oid("o");
        incr(&rt, &o).await.expect("incr");
        // Two TTLs pass during the commit; then node b tries to take the object.
        let (slow, hot, o2) = (clock_moves_on(&w.clock, 20), w.hot.clone(), o.clone());
        let b_refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refused = b_refused.clone();
        *cold.before_append.lock() = Some(Box::pin(async move {
            slow.await;
            let b = hot.acquire(&o2, &NodeId::new("b").expect("valid"), TTL).await;
            refused.store(b.is_err_and(|e| matches!(e.kind(), ErrorKind::LeaseHeld { .. })), Ordering::SeqCst);
        }));
        match how {
            "flush" => assert_eq!(rt.flush(&o).await.expect("flush").records, 1),
            "evict" => rt.evict(&o).await.expect("evict"),
            _ => assert_eq!(incr(&rt, &o).await.expect("the second change flushes both"), 2),
        }
        assert!(b_refused.load(Ordering::SeqCst), "{how}: node b took the object during the drain");
        assert_eq!(rt.metrics().self_fenced, 0, "{how}");
        if how != "evict" {
            let l = w.hot.current(&o).await.expect("current").expect("the lease is still live");
            assert_eq!(l.holder.as_str(), "a", "{how}");
        }
        assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 1 + u64::from(how == "auto-flush"), "{how}");
    }
}

/// A drain whose lease cannot be renewed (the guard refuses refreshes for good while a cold
/// commit takes two TTLs) is abandoned with `LeaseLost` saying so: the error said "nothing was
/// written", a handler's words, while a drain's commits before it may have landed.
#[tokio::test]
async fn a_drain_abandoned_for_a_lost_renewal_does_not_claim_nothing_was_written() {
    let w = World::new();
    let guard = Arc::new(FlakyGuard::new(&w));
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    let rt = w.runtime_with("a", guard.clone(), cold.clone(), settings());
    let o = oid("o");
    incr(&rt, &o).await.expect("incr");
    guard.broken_refreshes.store(1000, std::sync::atomic::Ordering::SeqCst);
    *cold.before_append.lock() = Some(clock_moves_on(&w.clock, 20));
    let e = rt.flush(&o).await.expect_err("the lease could not be renewed");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    let shown = e.to_string();
    assert!(!shown.contains("nothing was written") && shown.contains("abandoned"), "{shown}");
}

/// Object "o" with 20 keys written by runtime "a", then evicted (its state in cold storage only).
async fn populated_then_evicted(w: &World) -> ObjectId {
    let a = w.runtime("a", settings());
    let o = oid("o");
    populate(&a, &o, 20).await;
    a.evict(&o).await.expect("evict");
    o
}

/// Object "o" populated with 20 keys and flushed (the first snapshot, whose watermark is
/// returned), then `key/0003` overwritten with "newer" and the object evicted (a second one).
async fn overwritten_then_evicted(w: &World) -> (ObjectId, Watermark) {
    let a = w.runtime("a", settings());
    let o = oid("o");
    populate(&a, &o, 20).await;
    a.flush(&o).await.expect("first snapshot");
    let first = w.cold.watermark(&o).await.expect("watermark");
    let put = async |t: &mut ObjectTxn<'_>| t.put("key/0003", "newer");
    a.invoke(&o, put).await.expect("overwrite");
    a.evict(&o).await.expect("evict: a second snapshot");
    assert_eq!(w.cold.snapshots().await.expect("snapshots").len(), 2);
    (o, first)
}

/// An eager restore installs no state older than the watermark it decided on: from a cold store
/// whose state read lags its watermark read (a catalog replica answering an older table), it
/// fails retryably and writes nothing. Into a fresh hot store it installed the older state, so
/// the acknowledged change was not served and the next write took a sequence number cold already
/// held (its drain then `Corrupt`); into the store that evicted the object it was a `Conflict`
/// no retry could mend.
#[tokio::test]
async fn an_eager_restore_never_installs_state_older_than_its_watermark() {
    let w = World::new();
    let (o, _) = overwritten_then_evicted(&w).await;
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    let fresh = MemoryBackend::with_clock(Arc::new(w.clock.clone()));
    for (node, hot) in [("b", fresh.clone()), ("c", w.hot.clone())] {
        let rt = ObjectRuntime::builder(NodeId::new(node).expect("valid"))
            .with_hot_store(Arc::new(hot.clone()))
            .with_guard(Arc::new(w.hot.clone()))
            .with_cold_sink(cold.clone())
            .with_clock(Arc::new(w.clock.clone()))
            .with_settings(RuntimeSettings { keep_warm: Duration::ZERO, ..settings() })
            .build()
            .expect("build runtime");
        cold.lagging_loads.store(true, std::sync::atomic::Ordering::SeqCst);
        let e = get(&rt, &o, "key/0003").await.expect_err("the state read lags the watermark");
        assert_eq!(e.kind(), &ErrorKind::Unavailable, "{node}: {e}");
        assert!(e.is_retryable(), "{node}: {e}");
        cold.lagging_loads.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(get(&rt, &o, "key/0003").await.expect("restored").as_deref(), Some(&b"newer"[..]), "{node}");
        assert_eq!(all_state(&rt, &o).await.len(), 20, "{node}");
        rt.evict(&o).await.expect("evicted again");
    }
}

/// A world whose object "o" was written under token 5 (its lease's token plus 4), drained to
/// cold storage and evicted, and whose hot store has since accepted token 7: a guard that lost its
/// lease state (a new one) issues tokens below both.
async fn tokens_past_a_forgetful_guard() -> (World, ObjectId) {
    let w = World::new();
    let o = oid("o");
    let x = w.hot.acquire(&o, &NodeId::new("x").expect("node"), TTL).await.expect("acquire");
    let five = FencingToken::new(x.token.get() + 4);
    w.hot.put(&o, five, "T", "n", "1".into()).await.expect("put under a higher token");
    let changes = w.hot.read_changes(&o, 0, 100).await.expect("changes");
    w.cold.append(ColdBatch::single(o.clone(), five, changes)).await.expect("cold has it");
    w.hot.truncate_changes(&o, five, 1).await.expect("drained");
    w.hot.evict(&o, five).await.expect("evicted");
    let seven = FencingToken::new(five.get() + 2);
    w.hot.write(&o, seven, WriteBatch::new("T")).await.expect("the hot store accepts a higher token");
    (w, o)
}

/// A guard that does not floor its tokens at the hot store's (the builder requires it to)
/// grants a lease below cold storage's token, and raising the hot store's floor to cold's is
/// refused: the hot store already accepted a higher token. That is the guard's lost state,
/// `Corrupt` saying so; the call was answered `Fenced`, as if another holder had the object.
#[tokio::test]
async fn a_guard_below_the_hot_stores_tokens_is_corrupt_not_fenced() {
    let (w, o) = tokens_past_a_forgetful_guard().await;
    let forgetful = MemoryBackend::with_clock(Arc::new(w.clock.clone()));
    let rt = ObjectRuntime::builder(NodeId::new("b").expect("valid"))
        .with_hot_store(Arc::new(w.hot.clone()))
        .with_guard(Arc::new(forgetful))
        .with_cold_sink(Arc::new(w.cold.clone()))
        .with_clock(Arc::new(w.clock.clone()))
        .with_settings(settings())
        .build()
        .expect("build runtime");
    let e = incr(&rt, &o).await.expect_err("the guard lost its state");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("does not floor tokens"), "{e}");
}

/// The same guard, whose lease check then never answers (a hung connection): the activation
/// ends once a TTL has passed, with the hot store's refusal (`Fenced`: the lease is not known to
/// be current). It waited for ever, holding the object's slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the clock ticks while the call waits
async fn a_hung_lease_check_after_a_refused_token_floor_ends_after_a_ttl() {
    let (w, o) = tokens_past_a_forgetful_guard().await;
    let forgetful = World {
        clock: w.clock.clone(),
        hot: MemoryBackend::with_clock(Arc::new(w.clock.clone())),
        cold: w.cold.clone(),
    };
    let guard = Arc::new(FlakyGuard::new(&forgetful));
    guard.hang_validates.store(true, std::sync::atomic::Ordering::SeqCst);
    let rt = ObjectRuntime::builder(NodeId::new("b").expect("valid"))
        .with_hot_store(Arc::new(w.hot.clone()))
        .with_guard(guard)
        .with_cold_sink(Arc::new(w.cold.clone()))
        .with_clock(Arc::new(w.clock.clone()))
        .with_settings(settings())
        .build()
        .expect("build runtime");
    let ticking = tick(&w);
    let ended = tokio::time::timeout(Duration::from_secs(10), incr(&rt, &o)).await;
    ticking.abort();
    let e = ended.expect("ends once a TTL has passed").expect_err("not known to be current");
    assert!(e.is_fenced(), "{e}");
}

/// A lazy activation pins the snapshot its watermark is in: on a cold store whose snapshot list
/// lags its watermark (a catalog answering an older table to one read), the activation fails
/// retryably. It pinned the older snapshot and served its values as the object's latest state.
#[tokio::test]
async fn a_lazy_activation_never_pins_a_snapshot_older_than_its_watermark() {
    let w = World::new();
    let (o, _) = overwritten_then_evicted(&w).await;
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    cold.lagging_snapshots.store(true, std::sync::atomic::Ordering::SeqCst);
    let b = w.lazy_runtime("b", cold.clone());
    let e = get(&b, &o, "key/0003").await.expect_err("the snapshot list lags the watermark");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable(), "{e}");
    cold.lagging_snapshots.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(get(&b, &o, "key/0003").await.expect("lazy read").as_deref(), Some(&b"newer"[..]));
    assert_eq!(all_state(&b, &o).await.len(), 20);
}

/// A handler that swallows the `Fenced` of its lazy restore (its `list` completes the restore
/// into hot storage, where a newer holder's token fences it) does not get its answer out: the
/// call is `LeaseLost` and the activation dropped, though this node's own clock says its lease
/// still runs (the guard's clock ran ahead). The answer went out, and later calls kept answering
/// from the activation's old snapshot.
#[tokio::test]
async fn a_handler_that_swallows_a_fenced_lazy_restore_gets_no_answer_out() {
    let w = World::new();
    let o = populated_then_evicted(&w).await;
    // Runtime b's own clock stands still; the guard's (the world's) runs on.
    let b_clock = ManualClock::new(w.clock.now());
    let b = ObjectRuntime::builder(NodeId::new("b").expect("valid"))
        .with_hot_store(Arc::new(w.hot.clone()))
        .with_guard(Arc::new(w.hot.clone()))
        .with_cold_sink(Arc::new(w.cold.clone()))
        .with_accelerator(Arc::new(w.cold.clone()))
        .with_clock(Arc::new(b_clock))
        .with_settings(RuntimeSettings { restore: RestoreMode::Lazy, ..settings() })
        .build()
        .expect("runtime");
    assert_eq!(get(&b, &o, "key/0003").await.expect("lazy read").as_deref(), Some(&b"value-3"[..]));
    // The guard's clock passes b's lease; runtime c takes the object and overwrites a key.
    w.clock.advance(TTL * 3);
    let c = w.runtime("c", settings());
    c.invoke(&o, async |t: &mut ObjectTxn<'_>| t.put("key/0004", "c's")).await.expect("c writes");
    let answer = b
        .invoke(&o, async |t: &mut ObjectTxn<'_>| {
            let listed = t.list(KeyRange::all()).await;
            assert!(listed.as_ref().is_err_and(|e| e.is_fenced()), "the restore is fenced: {listed:?}");
            t.get("key/0004").await
        })
        .await;
    let e = answer.expect_err("the answer rests on a lease another node holds");
    assert_eq!(e.kind(), &ErrorKind::LeaseLost { object: o.clone() }, "{e}");
    // The activation is gone: the next call asks the guard, which says c holds the object.
    let e = get(&b, &o, "key/0004").await.expect_err("c holds the lease");
    assert!(matches!(e.kind(), ErrorKind::LeaseHeld { .. }), "{e}");
    assert_eq!(get(&c, &o, "key/0004").await.expect("c reads").as_deref(), Some(&b"c's"[..]));
}

/// One held object whose hot change log cannot be read (damaged: `Corrupt`), or whose
/// truncation fails, is left out of `flush_all` (still active) while the others are drained,
/// and the first error is returned at the end, as docs/runtime.md promises: the first such failure ended the
/// whole drain (every object of its commit and of later rounds stayed undrained, at every
/// `flush_all`; a failed truncation skipped the rest of its commit's truncations).
#[tokio::test]
async fn flush_all_drains_the_others_past_an_object_it_cannot_read_or_truncate() {
    let w = World::new();
    let (hot, _guard, rt) = w.faulty_runtime();
    let (a, b, c) = (oid("a"), oid("b"), oid("c"));
    for o in [&a, &b, &c] {
        incr(&rt, o).await.expect("write");
    }
    *hot.unreadable_changes.lock() = Some(a.clone());
    let e = rt.flush_all().await.expect_err("a's changes cannot be read");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert_eq!(w.cold.watermark(&a).await.expect("wm").through, 0, "a left out");
    // Left out of this flush, not given back: its activation stays (an unreadable moment is no
    // reason to let it go).
    assert!(w.hot.current(&a).await.expect("current").is_some(), "a is still held");
    for o in [&b, &c] {
        assert_eq!(w.cold.watermark(o).await.expect("wm").through, 1, "{o} drained");
        assert!(!w.hot.object_info(o).await.expect("info").expect("known").has_pending_changes(), "{o} truncated");
    }
    *hot.unreadable_changes.lock() = None;
    *hot.failing_truncates.lock() = Some(a.clone());
    for o in [&b, &c] {
        incr(&rt, o).await.expect("write again");
    }
    let e = rt.flush_all().await.expect_err("a's truncation fails");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert_eq!(w.cold.watermark(&a).await.expect("wm").through, 1, "a's change is in cold");
    for o in [&b, &c] {
        assert_eq!(w.cold.watermark(o).await.expect("wm").through, 2, "{o} drained");
        assert!(!w.hot.object_info(o).await.expect("info").expect("known").has_pending_changes(), "{o} truncated");
    }
    *hot.failing_truncates.lock() = None;
    rt.flush_all().await.expect("a is truncated now");
    assert!(!w.hot.object_info(&a).await.expect("info").expect("known").has_pending_changes());
}

/// A lazy object whose pinned snapshot expired re-pins the newest snapshot holding its state
/// through the activation's watermark, never an older one: with the snapshot list lagging (a
/// catalog replica answering an older table), the read fails retryably, then reads the latest
/// value. It re-pinned the older snapshot the lagging list named last and served its value
/// (`value-3`, overwritten by `newer`) as the object's state.
#[tokio::test]
async fn a_lazy_object_never_repins_a_snapshot_older_than_its_watermark() {
    let w = World::new();
    let (o, _) = overwritten_then_evicted(&w).await;
    let pinned = w.cold.snapshots().await.expect("snapshots").last().expect("the newest").id;
    let cold = Arc::new(ExpiringCold::new(w.cold.clone()));
    let b = w.lazy_runtime_reading("b", cold.clone(), cold.clone());
    assert_eq!(get(&b, &o, "key/0001").await.expect("lazy read").as_deref(), Some(&b"value-1"[..]));
    assert_eq!(b.metrics().recent_activations.back().and_then(|m| m.snapshot), Some(pinned));
    // Another object moves the table on; maintenance expires the pinned snapshot; the snapshot
    // list then answers from a replica behind by one table version.
    let c = w.runtime("c", settings());
    let p = oid("p");
    incr(&c, &p).await.expect("other object");
    c.flush(&p).await.expect("flush other");
    cold.expired.lock().insert(pinned);
    cold.lagging_snapshots.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = get(&b, &o, "key/0003").await.expect_err("the snapshot list lags the watermark");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable(), "{e}");
    cold.lagging_snapshots.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(get(&b, &o, "key/0003").await.expect("lazy read").as_deref(), Some(&b"newer"[..]));
}

/// The other direction: a watermark read from a replica behind the one the snapshot list comes
/// from. The pinned snapshot would hold changes past the watermark, and the object's next write
/// would take a sequence number cold already has. The activation fails retryably.
#[tokio::test]
async fn a_lazy_activation_never_pins_a_snapshot_newer_than_its_watermark() {
    let w = World::new();
    let (o, older) = overwritten_then_evicted(&w).await;
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    *cold.stale_watermark.lock() = Some(older);
    // Another node with a hot store of its own (it knows nothing of the object's truncations).
    let fresh = MemoryBackend::with_clock(Arc::new(w.clock.clone()));
    let b = ObjectRuntime::builder(NodeId::new("b").expect("node"))
        .with_hot_store(Arc::new(fresh.clone()))
        .with_guard(Arc::new(fresh))
        .with_cold_sink(cold.clone())
        .with_accelerator(Arc::new(w.cold.clone()))
        .with_clock(Arc::new(w.clock.clone()))
        .with_settings(RuntimeSettings { restore: RestoreMode::Lazy, ..settings() })
        .build()
        .expect("runtime");
    let e = get(&b, &o, "key/0003").await.expect_err("the watermark lags the snapshot list");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    *cold.stale_watermark.lock() = None;
    assert_eq!(get(&b, &o, "key/0003").await.expect("lazy read").as_deref(), Some(&b"newer"[..]));
}

/// A cold sink whose change at an object's watermark is gone (collapsed away: a delete older than
/// the horizon goes with the versions before it, and the watermark stays) answers the default
/// `head` from the object's state at the snapshot: a lazy activation goes through. (Checking
/// only for the change at the watermark refused it for good.)
#[tokio::test]
async fn a_lazy_activation_whose_last_change_was_collapsed_away_goes_through() {
    let w = World::new();
    let o = populated_then_evicted(&w).await;
    let wm = w.cold.watermark(&o).await.expect("watermark");
    let cold = Arc::new(Collapsed { inner: w.cold.clone(), gone: wm.through });
    let (snapshot, at) = cold.head(&o).await.expect("head");
    assert_eq!((snapshot, at), (w.cold.snapshots().await.expect("snapshots").last().map(|s| s.id), wm));
    let b = w.lazy_runtime("b", cold);
    assert_eq!(get(&b, &o, "key/0003").await.expect("lazy read").as_deref(), Some(&b"value-3"[..]));
}

/// A lazy restore the hot store refuses for good (its sequence is past the pinned cold state:
/// `restore_behind_hot`, a non-retryable `Conflict`) spends the activation: the call fails, the
/// lease goes back, and the next call activates afresh. (Kept, every later write of the
/// activation failed alike, and its traffic kept the lease warm.)
#[tokio::test]
async fn a_lazy_restore_the_hot_store_refuses_for_good_ends_the_activation() {
    let w = World::new();
    let o = populated_then_evicted(&w).await;
    let b = w.lazy_runtime("b", Arc::new(w.cold.clone()));
    assert_eq!(get(&b, &o, "key/0003").await.expect("lazy read").as_deref(), Some(&b"value-3"[..]));
    let lease = w.hot.current(&o).await.expect("current").expect("b holds the object");
    let through = w.cold.watermark(&o).await.expect("watermark").through;
    // The hot store moves past the pinned state under b's own token (a state installed behind
    // its back): the restore before b's first commit can never succeed.
    w.hot.restore(&o, lease.token, Vec::new(), through + 5).await.expect("hot past the pinned state");
    let activations = b.metrics().activations;
    let e = incr(&b, &o).await.expect_err("the restore before the commit is refused");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(e.is_retryable(), "the next call activates afresh: {e}");
    assert_eq!(w.hot.current(&o).await.expect("current"), None, "the lease went back");
    assert_eq!(incr(&b, &o).await.expect("the next call activates afresh"), 1);
    assert_eq!(b.metrics().activations, activations + 1);
}

/// A cold sink that no longer holds the change of sequence number `gone` (collapsed away).
#[derive(Debug)]
struct Collapsed {
    inner: MemoryColdStore,
    gone: Seq,
}

#[async_trait::async_trait]
impl ColdSink for Collapsed {
    async fn append(&self, batch: ColdBatch) -> Result<ColdCommit> {
        self.inner.append(batch).await
    }
    async fn watermark(&self, object: &ObjectId) -> Result<Watermark> {
        self.inner.watermark(object).await
    }
    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.inner.snapshots().await
    }
    async fn load_state(&self, object: &ObjectId, as_of: AsOf) -> Result<ColdState> {
        self.inner.load_state(object, as_of).await
    }
    async fn read_changes(&self, object: &ObjectId, after: Seq, as_of: AsOf) -> Result<Vec<ChangeRecord>> {
        let mut records = self.inner.read_changes(object, after, as_of).await?;
        records.retain(|r| r.seq != self.gone);
        Ok(records)
    }
}

/// A lazy activation on a sink without a single read of its table (the default `head` reads the
/// object's whole state to check the snapshot it pins) keeps its lease renewed meanwhile, as an
/// eager restore does: a read outlasting the TTL (here two) goes through.
#[tokio::test]
async fn a_lazy_activation_whose_head_outlasts_the_lease_keeps_it() {
    let w = World::new();
    let o = populated_then_evicted(&w).await;
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    // The store's own watermark, given as a "stale" one: `head` goes through separate reads.
    *cold.stale_watermark.lock() = Some(w.cold.watermark(&o).await.expect("watermark"));
    *cold.before_load.lock() = Some(clock_moves_on(&w.clock, 20));
    let b = w.lazy_runtime("b", cold.clone());
    assert_eq!(get(&b, &o, "key/0003").await.expect("lazy read").as_deref(), Some(&b"value-3"[..]));
    assert_eq!(cold.loads.load(std::sync::atomic::Ordering::SeqCst), 1, "head read the state once");
    assert_eq!(b.metrics().self_fenced, 0);
}

/// An eager restore that outlasts the lease (a large state read from cold, here two TTLs)
/// keeps the lease renewed: the activating call goes through. It ran without renewal, and the
/// call failed with `LeaseLost` after loading the whole state.
#[tokio::test]
async fn an_eager_restore_that_outlasts_the_lease_keeps_it() {
    let w = World::new();
    let o = populated_then_evicted(&w).await;
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    let b = w.runtime_with("b", Arc::new(w.hot.clone()), cold.clone(), settings());
    *cold.before_load.lock() = Some(clock_moves_on(&w.clock, 20));
    assert_eq!(incr(&b, &o).await.expect("the activation restores, then the call writes"), 1);
    assert_eq!(cold.loads.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(b.metrics().self_fenced, 0);
    assert_eq!(all_state(&b, &o).await.len(), 21);
}

/// A renewal that fails without the lease being lost (a backend error) during the restore before
/// a lazy object's first commit fails the call and gives the lease back, as a failed renewal
/// during the handler does: the next call (here, at once) is not refused by this node's own
/// lease for the rest of its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_renewal_during_a_lazy_restore_gives_the_lease_back() {
    let w = World::new();
    let o = populated_then_evicted(&w).await;
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    let guard = Arc::new(FlakyGuard::new(&w));
    let b =
        w.runtime_with("b", guard.clone(), cold.clone(), RuntimeSettings { restore: RestoreMode::Lazy, ..settings() });
    assert_eq!(get(&b, &o, "key/0003").await.expect("lazy read").as_deref(), Some(&b"value-3"[..]));
    // The load takes half a TTL: the renewal due meanwhile fails.
    *cold.before_load.lock() = Some(clock_moves_on(&w.clock, 5));
    guard.broken_refreshes.store(1, std::sync::atomic::Ordering::SeqCst);
    let e = incr(&b, &o).await.expect_err("the renewal failed");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    assert_eq!(w.hot.current(&o).await.expect("current"), None, "given back");
    assert_eq!(incr(&b, &o).await.expect("at once"), 1, "nothing of the failed call written");
    assert_eq!(all_state(&b, &o).await.len(), 21);
}

/// Without an accelerator a lazy read of one key costs a read of the object's whole cold state:
/// the first miss keeps all of it, so later reads (of present and absent keys) ask cold nothing.
/// Before, every distinct key read the whole state again.
#[tokio::test]
async fn a_lazy_object_without_an_accelerator_reads_its_cold_state_once() {
    let w = World::new();
    let o = populated_then_evicted(&w).await;
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    let b = w.lazy_runtime_without_accelerator("b", cold.clone());
    for i in 0..10 {
        let key = format!("key/{i:04}");
        assert_eq!(get(&b, &o, &key).await.expect("lazy read"), Some(Bytes::from(format!("value-{i}"))), "{key}");
    }
    assert_eq!(get(&b, &o, "gone").await.expect("absent"), None);
    assert_eq!(get(&b, &o, "never").await.expect("absent"), None);
    b.prefetch(&o, &["key/0001".into()], &["key/001".into()]).await.expect("prefetch");
    assert_eq!(b.metrics().preloaded_keys, 11, "the named key and the prefix's ten");
    assert_eq!(cold.loads.load(std::sync::atomic::Ordering::SeqCst), 1, "one read of the whole state");
    assert_eq!(b.metrics().recent_activations.back().map(|m| m.recovery), Some(Recovery::Lazy));
    // A write completes the restore; every key is there.
    assert_eq!(incr(&b, &o).await.expect("write"), 1);
    assert_eq!(all_state(&b, &o).await.len(), 21);
}

/// `flush_all` skips objects whose lease this runtime no longer holds: their changes are not
/// appended under a stale token, and one such object does not fence the whole flush.
#[tokio::test]
async fn flush_all_skips_objects_taken_over_by_another_runtime() {
    let w = World::new();
    let a = w.runtime("a", settings());
    let (x, y) = (oid("x"), oid("y"));
    incr(&a, &x).await.expect("a writes x");
    w.clock.advance(TTL + Duration::from_millis(1));
    // b takes x over, flushes its state, and writes once more (pending in hot under b's token).
    let b = w.runtime("b", settings());
    assert_eq!(incr(&b, &x).await.expect("b writes x"), 2);
    b.flush_all().await.expect("b flushes");
    assert_eq!(incr(&b, &x).await.expect("b writes x again"), 3);
    incr(&a, &y).await.expect("a writes y");
    let report = a.flush_all().await.expect("a's flush is not fenced by x");
    assert_eq!(report.objects, 1, "only y: {report:?}");
    assert_eq!(w.cold.watermark(&y).await.expect("wm y").through, 1);
    let x_changes = w.cold.read_changes(&x, 0, AsOf::Latest).await.expect("cold x");
    assert_eq!(x_changes.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2], "b's pending change stays b's");
    b.flush_all().await.expect("b flushes again");
    let x_changes = w.cold.read_changes(&x, 0, AsOf::Latest).await.expect("cold x");
    assert_eq!(x_changes.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2, 3], "every change once");
}

/// `maintain` forgets objects whose leases were released, so a long-running runtime does not
/// keep a slot for every object it ever touched.
#[tokio::test]
async fn maintain_forgets_released_objects() {
    let w = World::new();
    let rt = w.runtime("a", RuntimeSettings { keep_warm: Duration::from_secs(5), ..settings() });
    for i in 0..50 {
        incr(&rt, &oid(&format!("o{i}"))).await.expect("incr");
    }
    assert_eq!(rt.tracked_objects(), 50);
    rt.maintain().await.expect("maintain");
    assert_eq!(rt.tracked_objects(), 50, "still warm");
    w.clock.advance(Duration::from_secs(6));
    incr(&rt, &oid("o0")).await.expect("keeps o0 warm");
    rt.maintain().await.expect("maintain");
    assert_eq!(rt.tracked_objects(), 1, "only the warm object is left");
    assert_eq!(incr(&rt, &oid("o7")).await.expect("a forgotten object comes back"), 2);
}

fn flaky_runtime(w: &World, cold: Arc<FlakyCold>) -> ObjectRuntime {
    w.runtime_with("a", Arc::new(w.hot.clone()), cold, settings())
}

/// Keeps the manual clock moving (retries sleep on it) until aborted: 20 ms per real 1 ms.
fn tick(w: &World) -> tokio::task::JoinHandle<()> {
    tick_by(w, Duration::from_millis(20))
}

/// Advances the manual clock by `step` every real millisecond until aborted.
fn tick_by(w: &World, step: Duration) -> tokio::task::JoinHandle<()> {
    let clock = w.clock.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            clock.advance(step);
        }
    })
}

/// A recovery that fails (cold unreachable) gives its lease back, and a failed eviction keeps
/// the object active: neither locks this node out of its own object with `LeaseHeld`.
#[tokio::test]
async fn failed_recovery_and_failed_eviction_do_not_strand_the_lease() {
    let w = World::new();
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    let rt = flaky_runtime(&w, cold.clone());
    let o = oid("o");
    assert_eq!(incr(&rt, &o).await.expect("first"), 1);
    rt.evict(&o).await.expect("evict: the state is in cold only now");

    cold.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let ticking = tick(&w);
    let failed = incr(&rt, &o).await.expect_err("recovery needs cold");
    ticking.abort();
    assert_eq!(failed.kind(), &ErrorKind::Unavailable, "{failed}");
    assert_eq!(w.hot.current(&o).await.expect("current"), None, "the lease of the failed recovery was released");
    cold.down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(incr(&rt, &o).await.expect("recovers at once, no LeaseHeld"), 2);

    cold.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let ticking = tick(&w);
    let failed = rt.evict(&o).await.expect_err("eviction drains to cold first");
    ticking.abort();
    assert_eq!(failed.kind(), &ErrorKind::Unavailable, "{failed}");
    cold.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let activations = rt.metrics().activations;
    assert_eq!(incr(&rt, &o).await.expect("still active after the failed eviction"), 3);
    assert_eq!(rt.metrics().activations, activations, "not re-activated");
    rt.evict(&o).await.expect("evict");
    assert_eq!(incr(&rt, &o).await.expect("restored"), 4);
}

/// An object whose keys were all deleted and drained activates from hot storage: no restore
/// from cold, and it runs while cold storage is unreachable (it looked evicted: each activation
/// restored its empty state from cold, and failed `Unavailable` with cold down). An evicted
/// object is still restored from cold, and is `Unavailable` (never served empty) with cold down.
#[tokio::test]
async fn an_emptied_object_activates_from_hot_and_an_evicted_one_from_cold() {
    let w = World::new();
    let (emptied, evicted) = (oid("emptied"), oid("evicted"));
    {
        let rt = w.runtime("a", settings());
        for o in [&emptied, &evicted] {
            incr(&rt, o).await.expect("incr");
        }
        rt.invoke(&emptied, async |t: &mut ObjectTxn<'_>| t.delete("n")).await.expect("delete");
        rt.flush_all().await.expect("drained");
        rt.evict(&evicted).await.expect("evict");
        rt.shutdown().await.expect("shutdown: the leases are given back");
    }
    let info = w.hot.object_info(&emptied).await.expect("info").expect("object");
    assert_eq!((info.keys, info.has_pending_changes(), info.resident), (0, false, true), "{info:?}");

    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    let rt = flaky_runtime(&w, cold.clone());
    assert_eq!(get(&rt, &emptied, "n").await.expect("activates"), None);
    assert_eq!(rt.metrics().eager_restores, 0, "nothing to restore: its empty state is its whole state");
    assert_eq!(cold.loads.load(std::sync::atomic::Ordering::SeqCst), 0, "no cold state read");
    rt.shutdown().await.expect("shutdown");

    cold.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let rt = flaky_runtime(&w, cold.clone());
    assert_eq!(incr(&rt, &emptied).await.expect("runs from hot with cold unreachable"), 1);
    let ticking = tick(&w);
    let e = incr(&rt, &evicted).await.expect_err("the evicted object needs cold");
    ticking.abort();
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    cold.down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(incr(&rt, &evicted).await.expect("restored from cold"), 2);
    assert_eq!(rt.metrics().eager_restores, 1, "{:?}", rt.metrics());
}

/// An object evicted before it was ever written (activated by a read, then evicted), written and
/// emptied later, still activates from hot: the evict marked nothing. (It was marked evicted
/// for good: no restore comes for an object with nothing in cold storage, so once emptied it
/// was restored at each activation and failed `Unavailable` with cold down.)
#[tokio::test]
async fn an_object_evicted_before_any_write_is_not_marked_evicted() {
    let w = World::new();
    let o = oid("read-only");
    {
        let rt = w.runtime("a", settings());
        assert_eq!(get(&rt, &o, "n").await.expect("a read activates it"), None);
        rt.evict(&o).await.expect("evict");
        assert_eq!(rt.metrics().evictions, 1, "the hot store's evict ran (the object was active)");
        incr(&rt, &o).await.expect("incr");
        rt.invoke(&o, async |t: &mut ObjectTxn<'_>| t.delete("n")).await.expect("delete");
        rt.flush_all().await.expect("drained");
        rt.shutdown().await.expect("shutdown");
    }
    let info = w.hot.object_info(&o).await.expect("info").expect("object");
    assert_eq!((info.keys, info.resident), (0, true), "{info:?}");
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    cold.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let rt = flaky_runtime(&w, cold.clone());
    assert_eq!(incr(&rt, &o).await.expect("runs from hot with cold unreachable"), 1);
}

/// `flush_all` while a handler of one object invokes another: the busy object is skipped, not
/// waited for (waiting while holding the other object's slot deadlocked with that handler).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_all_skips_a_busy_object_instead_of_deadlocking() {
    let w = World::new();
    let rt = w.runtime("a", settings());
    let (a, b) = (oid("a"), oid("b"));
    incr(&rt, &a).await.expect("a");
    incr(&rt, &b).await.expect("b");
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let handler = {
        let rt = rt.clone();
        let (a, b) = (a.clone(), b.clone());
        tokio::spawn(async move {
            rt.invoke(&b, async |t: &mut ObjectTxn<'_>| {
                t.put("n", "10")?;
                started_tx.send(()).expect("signal");
                go_rx.await.expect("go");
                incr(&rt, &a).await
            })
            .await
        })
    };
    started_rx.await.expect("handler running");
    let report = tokio::time::timeout(Duration::from_secs(10), rt.flush_all())
        .await
        .expect("flush_all finished")
        .expect("flush");
    assert_eq!(report.busy, 1, "{report:?}");
    assert_eq!(report.objects, 1, "a was flushed: {report:?}");
    go_tx.send(()).expect("go");
    let inner = tokio::time::timeout(Duration::from_secs(10), handler).await.expect("handler finished");
    assert_eq!(inner.expect("join").expect("handler"), 2);
    let after = rt.flush_all().await.expect("flush");
    assert_eq!((after.busy, after.objects), (0, 2), "{after:?}");
    assert_eq!(rt.shutdown().await.expect("shutdown").busy, 0);
}

/// A guard that keeps failing renewals transiently is retried with backoff, not in a tight loop,
/// until the lease runs out and the handler is self-fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_renewals_back_off_until_the_handler_self_fences() {
    let w = World::new();
    const FAILS: u32 = 100_000;
    let (guard, rt) = w.flaky_guard_runtime(settings());
    let o = oid("o");
    incr(&rt, &o).await.expect("activate");
    guard.fail_refreshes.store(FAILS, std::sync::atomic::Ordering::SeqCst);
    let ticking = tick_by(&w, Duration::from_millis(10));
    let r: Result<()> = rt
        .invoke(&o, async |t: &mut ObjectTxn<'_>| {
            t.put("k", "v")?;
            std::future::pending::<()>().await;
            Ok(())
        })
        .await;
    ticking.abort();
    let e = r.expect_err("self-fenced");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    let attempts = FAILS - guard.fail_refreshes.load(std::sync::atomic::Ordering::SeqCst);
    // Without backoff: one attempt per clock tick (about 600 over the two thirds of the TTL).
    assert!((1..60).contains(&attempts), "{attempts} renewal attempts");
}

/// A guard that keeps failing renewals transiently: the handler is abandoned once its lease runs
/// out, not up to a tenth of the TTL later (the renewal's backoff overslept the expiry: here
/// 5.6 s of a 70 s lease, while another node could already hold the object). The clock moves
/// 100 ms per real millisecond and stops 1 s past the lease's expiry: a renewal that oversleeps
/// the expiry by more never wakes, and the call's real-time bound fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_whose_renewals_keep_failing_ends_at_its_leases_expiry() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(RuntimeSettings { lease_ttl: Duration::from_secs(70), ..settings() });
    let o = oid("o");
    incr(&rt, &o).await.expect("activate");
    guard.fail_refreshes.store(100_000, std::sync::atomic::Ordering::SeqCst);
    let expiry: Arc<parking_lot::Mutex<Option<dotdo_core::Timestamp>>> = Arc::new(parking_lot::Mutex::new(None));
    let ticking = {
        let (clock, expiry) = (w.clock.clone(), expiry.clone());
        tokio::spawn(async move {
            loop {
                #[allow(clippy::disallowed_methods)] // the ticker's real pace
                tokio::time::sleep(Duration::from_millis(1)).await;
                let stop = expiry.lock().is_some_and(|e| clock.now() >= e.plus(Duration::from_secs(1)));
                if !stop {
                    clock.advance(Duration::from_millis(100));
                }
            }
        })
    };
    let (hot, seen, object) = (w.hot.clone(), expiry.clone(), o.clone());
    let call = rt.invoke(&o, async move |t: &mut ObjectTxn<'_>| {
        *seen.lock() = hot.current(&object).await?.map(|l| l.expires_at);
        t.put("k", "v")?;
        std::future::pending::<()>().await;
        Ok(())
    });
    #[allow(clippy::disallowed_methods)] // a real bound on a call that would otherwise never end
    let r: Result<()> = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the handler ends by 1 s past its lease's expiry (the clock stops there)");
    ticking.abort();
    let e = r.expect_err("self-fenced");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    assert!(expiry.lock().is_some(), "the handler saw its lease");
}

/// A hot store whose `evict` drops the state and then loses the reply (`AmbiguousOutcome`), as a
/// remote store's dropped connection would, whose next `fail_writes` writes fail with a
/// retryable `Unavailable`, and which runs `after_truncate` (once) after the next truncate.
struct FaultyHot {
    inner: MemoryBackend,
    fail_writes: std::sync::atomic::AtomicU32,
    /// `object_info` calls so far.
    info_reads: std::sync::atomic::AtomicUsize,
    after_truncate: parking_lot::Mutex<Option<futures::future::BoxFuture<'static, ()>>>,
    /// The most change records any `read_changes` returned.
    most_read: std::sync::atomic::AtomicUsize,
    /// `objects_with_pending_changes` fails.
    fail_listing: std::sync::atomic::AtomicBool,
    /// Runs once, after `objects_with_pending_changes` read its answer and before it returns it.
    after_listing: parking_lot::Mutex<Option<futures::future::BoxFuture<'static, ()>>>,
    /// The next write is held back (not applied) and answered `AmbiguousOutcome`: a request
    /// still queued at a remote primary when the client gave up on it.
    hold_next_write: std::sync::atomic::AtomicBool,
    held: parking_lot::Mutex<Vec<(ObjectId, FencingToken, WriteBatch)>>,
    /// The next write is held back (into `held`) and never answered: the caller gives up on it.
    hang_next_write: std::sync::atomic::AtomicBool,
    /// Restores apply, then report `AmbiguousOutcome`.
    ambiguous_restores: std::sync::atomic::AtomicU32,
    /// Restores of more value bytes than this (0: no limit) are refused, as a remote primary
    /// or a proxy refuses a request too large for it (`LimitExceeded` with no figures).
    restore_byte_limit: std::sync::atomic::AtomicUsize,
    /// At most this many changes per `read_changes` (0: as many as asked), as the SQL stores
    /// answer past 8 MiB of values.
    changes_per_read: std::sync::atomic::AtomicUsize,
    /// `evict` is refused (`Conflict`: a change landed after the drain), dropping nothing.
    refuse_evicts: std::sync::atomic::AtomicBool,
    /// `read_changes` of this object fails (`Corrupt`: its change log is damaged).
    unreadable_changes: parking_lot::Mutex<Option<ObjectId>>,
    /// `truncate_changes` of this object fails (`Unavailable`), truncating nothing.
    failing_truncates: parking_lot::Mutex<Option<ObjectId>>,
    /// This many `evict` calls fail `Unavailable` (busy), dropping nothing.
    busy_evicts: std::sync::atomic::AtomicU32,
    /// `evict` answers `Ok` once it applied (not the lost reply it answers otherwise).
    honest_evicts: std::sync::atomic::AtomicBool,
}

impl FaultyHot {
    fn new(inner: MemoryBackend) -> Self {
        FaultyHot {
            inner,
            fail_writes: 0.into(),
            after_truncate: Default::default(),
            most_read: 0.into(),
            fail_listing: false.into(),
            after_listing: Default::default(),
            hold_next_write: false.into(),
            hang_next_write: false.into(),
            ambiguous_restores: 0.into(),
            restore_byte_limit: 0.into(),
            held: Default::default(),
            changes_per_read: 0.into(),
            refuse_evicts: false.into(),
            busy_evicts: 0.into(),
            honest_evicts: false.into(),
            unreadable_changes: Default::default(),
            failing_truncates: Default::default(),
            info_reads: 0.into(),
        }
    }
}

impl std::fmt::Debug for FaultyHot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyHot").field("inner", &self.inner).finish()
    }
}

#[async_trait::async_trait]
impl HotStore for FaultyHot {
    async fn write(&self, object: &ObjectId, token: FencingToken, batch: WriteBatch) -> Result<WriteReceipt> {
        let left = self.fail_writes.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.fail_writes.store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::unavailable("hot store busy (test)"));
        }
        if self.hold_next_write.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.held.lock().push((object.clone(), token, batch));
            return Err(Error::new(ErrorKind::AmbiguousOutcome, "the request timed out at the primary (test)"));
        }
        if self.hang_next_write.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.held.lock().push((object.clone(), token, batch));
            return std::future::pending().await;
        }
        self.inner.write(object, token, batch).await
    }
    async fn get(&self, object: &ObjectId, key: &str) -> Result<Option<Bytes>> {
        self.inner.get(object, key).await
    }
    async fn list(&self, object: &ObjectId, range: KeyRange, limit: Option<usize>) -> Result<Vec<Entry>> {
        self.inner.list(object, range, limit).await
    }
    async fn read_changes(&self, object: &ObjectId, after: Seq, limit: usize) -> Result<Vec<ChangeRecord>> {
        if self.unreadable_changes.lock().as_ref() == Some(object) {
            return Err(Error::corrupt(format!("change log of {object} damaged (test)")));
        }
        let most = self.changes_per_read.load(std::sync::atomic::Ordering::SeqCst);
        let limit = if most > 0 { limit.min(most) } else { limit };
        let r = self.inner.read_changes(object, after, limit).await?;
        self.most_read.fetch_max(r.len(), std::sync::atomic::Ordering::SeqCst);
        Ok(r)
    }
    async fn truncate_changes(&self, object: &ObjectId, token: FencingToken, through: Seq) -> Result<()> {
        if self.failing_truncates.lock().as_ref() == Some(object) {
            return Err(Error::unavailable(format!("truncating {object} failed (test)")));
        }
        self.inner.truncate_changes(object, token, through).await?;
        let hook = self.after_truncate.lock().take();
        if let Some(hook) = hook {
            hook.await;
        }
        Ok(())
    }
    async fn object_info(&self, object: &ObjectId) -> Result<Option<ObjectInfo>> {
        self.info_reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.object_info(object).await
    }
    async fn objects_with_pending_changes(&self, after: Option<&ObjectId>, limit: usize) -> Result<Vec<ObjectId>> {
        if self.fail_listing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::unavailable("listing failed (test)"));
        }
        let listed = self.inner.objects_with_pending_changes(after, limit).await?;
        let hook = self.after_listing.lock().take();
        if let Some(hook) = hook {
            hook.await;
        }
        Ok(listed)
    }
    async fn evict(&self, object: &ObjectId, token: FencingToken) -> Result<()> {
        if self.refuse_evicts.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Conflict, "a change is pending (test)"));
        }
        let busy = self.busy_evicts.load(std::sync::atomic::Ordering::SeqCst);
        if busy > 0 {
            self.busy_evicts.store(busy - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::unavailable("hot store busy (test)"));
        }
        self.inner.evict(object, token).await?;
        if self.honest_evicts.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        Err(Error::new(ErrorKind::AmbiguousOutcome, "evicted, but the reply was lost (test)"))
    }
    async fn restore(&self, object: &ObjectId, token: FencingToken, entries: Vec<Entry>, through: Seq) -> Result<()> {
        let limit = self.restore_byte_limit.load(std::sync::atomic::Ordering::SeqCst);
        if limit > 0 && entries.iter().map(|e| e.value.len()).sum::<usize>() > limit {
            return Err(Error::new(
                ErrorKind::LimitExceeded { what: "request body", limit: 0, actual: 0 },
                "the primary refused the request as too large (test)",
            ));
        }
        self.inner.restore(object, token, entries, through).await?;
        let left = self.ambiguous_restores.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.ambiguous_restores.store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::new(ErrorKind::AmbiguousOutcome, "restored, but the reply was lost (test)"));
        }
        Ok(())
    }
}

/// An acquire whose outcome stays unknown (four ambiguous answers that did not land) fails the
/// call before anything of it ran: a retryable `Unavailable` saying so, not `AmbiguousOutcome`.
#[tokio::test]
async fn an_acquire_of_unknown_outcome_fails_the_call_as_unavailable() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(settings());
    let o = oid("o");
    guard.refused_ambiguous_acquires.store(4, std::sync::atomic::Ordering::SeqCst);
    let e = incr(&rt, &o).await.expect_err("no lease");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("nothing of the call was written"), "{e}");
    assert!(e.message().starts_with("o: "), "names the object: {e}");
    assert_eq!(incr(&rt, &o).await.expect("next call"), 1);
}

/// A restore of unknown outcome while activating an object is not the call's write: the caller
/// gets a retryable `Unavailable` saying nothing of the call was written (not `AmbiguousOutcome`,
/// which would send it to read back a write that never ran), and the next call goes on.
#[tokio::test]
async fn an_activation_step_of_unknown_outcome_is_unavailable_not_ambiguous() {
    for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
        let w = World::new();
        let a = w.runtime("a", settings());
        let o = oid("o");
        assert_eq!(incr(&a, &o).await.expect("first"), 1);
        a.evict(&o).await.expect("evict");
        let hot = Arc::new(FaultyHot::new(w.hot.clone()));
        hot.ambiguous_restores.store(1, std::sync::atomic::Ordering::SeqCst);
        let b = w.runtime_with_hot("b", hot.clone(), RuntimeSettings { restore: mode.clone(), ..settings() });
        let e = incr(&b, &o).await.expect_err("the restore's outcome is unknown");
        assert_eq!(e.kind(), &ErrorKind::Unavailable, "{mode:?}: {e}");
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains("nothing of the call was written"), "{e}");
        assert_eq!(incr(&b, &o).await.expect("next call"), 2, "{mode:?}");
    }
}

/// A hot store refusing a restore as too large for it (a remote primary's or a proxy's request
/// limit) is `LimitExceeded` for the caller, eager and lazy alike: it read as `Corrupt` blaming
/// the cold state ("a cold sink that broke its contract"), which was whole. Cold state that does
/// break the restore's rules is still `Corrupt`.
#[tokio::test]
async fn a_restore_the_hot_store_refuses_as_too_large_is_limit_exceeded_not_corrupt() {
    for mode in [RestoreMode::Eager, RestoreMode::Lazy] {
        let w = World::new();
        let a = w.runtime("a", settings());
        let o = oid("o");
        populate(&a, &o, 200).await;
        a.evict(&o).await.expect("evict");
        let hot = Arc::new(FaultyHot::new(w.hot.clone()));
        hot.restore_byte_limit.store(1024, std::sync::atomic::Ordering::SeqCst);
        let b = w.runtime_with_hot("b", hot.clone(), RuntimeSettings { restore: mode.clone(), ..settings() });
        let e = incr(&b, &o).await.expect_err("the restore is too large for the hot store");
        assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{mode:?}: {e}");
        assert!(e.to_string().contains("the hot store refused the restore"), "{mode:?}: {e}");
        hot.restore_byte_limit.store(0, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(incr(&b, &o).await.expect("once the hot store takes it"), 1, "{mode:?}");
        assert_eq!(get(&b, &o, "key/0199").await.expect("restored").as_deref(), Some(&b"value-199"[..]), "{mode:?}");
    }
}

/// `complete_restores` whose restore has an unknown outcome answers a retryable `Unavailable`
/// (the restore is simply done again; there is nothing to settle), and the next round completes.
#[tokio::test]
async fn complete_restores_of_unknown_outcome_is_unavailable() {
    let w = World::new();
    let a = w.runtime("a", settings());
    let o = oid("o");
    assert_eq!(incr(&a, &o).await.expect("first"), 1);
    a.evict(&o).await.expect("evict");
    let hot = Arc::new(FaultyHot::new(w.hot.clone()));
    let b = w.runtime_with_hot("b", hot.clone(), RuntimeSettings { restore: RestoreMode::Lazy, ..settings() });
    assert_eq!(get(&b, &o, "n").await.expect("lazy read"), Some(Bytes::from("1")));
    hot.ambiguous_restores.store(1, std::sync::atomic::Ordering::SeqCst);
    let e = b.complete_restores().await.expect_err("the restore's outcome is unknown");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable(), "{e}");
    b.complete_restores().await.expect("done again");
    assert_eq!(incr(&b, &o).await.expect("next call"), 2);
}

/// Activation compares with cold only the pending changes cold may also have (through its
/// watermark), not every pending change: after a crash between a cold commit of 5 changes and
/// its truncation, with 500 more pending, it reads 5.
#[tokio::test]
async fn activation_reads_only_the_pending_changes_cold_may_have() {
    let w = World::new();
    let a = w.runtime("a", settings());
    let o = oid("o");
    for _ in 0..5 {
        incr(&a, &o).await.expect("incr");
    }
    // Committed to cold, never truncated (the process died in between).
    let records = w.hot.read_changes(&o, 0, 100).await.expect("changes");
    let token = records[0].token;
    w.cold.append(ColdBatch::single(o.clone(), token, records)).await.expect("cold commit");
    for _ in 0..500 {
        incr(&a, &o).await.expect("incr");
    }
    drop(a); // dies: its lease runs out
    w.clock.advance(TTL + Duration::from_millis(1));
    let hot = Arc::new(FaultyHot::new(w.hot.clone()));
    let b = w.runtime_with_hot("b", hot.clone(), RuntimeSettings { flush_batch_records: 50, ..settings() });
    assert_eq!(get(&b, &o, "n").await.expect("activates"), Some(Bytes::from("505")));
    assert_eq!(hot.most_read.load(std::sync::atomic::Ordering::SeqCst), 5, "only the overlap was read");
}

/// An object `flush_all` lists with changes waiting and no holder, but that its holder drains and
/// evicts before `flush_all` takes its lease, is left evicted: looked at again under the lease,
/// it has nothing to drain. (It was activated, and its whole state restored from cold storage
/// into hot storage with nobody holding it, undoing the eviction.)
#[tokio::test]
async fn flush_all_does_not_restore_an_object_evicted_after_it_was_listed() {
    let w = World::new();
    let b = w.runtime("b", RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    let x = oid("x");
    incr(&b, &x).await.expect("b writes x");
    incr(&b, &x).await.expect("b writes x again");
    assert_eq!(w.hot.objects_with_pending_changes(None, 10).await.expect("pending"), [oid("x")]);
    let hot = Arc::new(FaultyHot::new(w.hot.clone()));
    let a = w.runtime_with_hot("a", hot.clone(), settings());
    let (b2, taken) = (b.clone(), x.clone());
    *hot.after_listing.lock() = Some(Box::pin(async move {
        b2.evict(&taken).await.expect("b drains and evicts x");
    }));
    let report = a.flush_all().await.expect("flush_all");
    assert_eq!(report.records, 0, "b drained x: {report:?}");
    let info = w.hot.object_info(&x).await.expect("info");
    assert!(info.as_ref().is_none_or(|i| i.keys == 0), "x stays evicted: {info:?}");
    assert_eq!(a.metrics().activations, 0, "a never activated x");
    assert_eq!(w.hot.current(&x).await.expect("current"), None, "a gave the lease back");
    assert_eq!(incr(&a, &x).await.expect("x comes back from cold"), 3);
}

/// An eviction whose outcome is unknown never leaves the object running on what may be an empty
/// hot store: the next call activates afresh and recovers the state from cold (it used to read
/// nothing and count from zero again).
#[tokio::test]
async fn an_eviction_with_an_unknown_outcome_is_not_run_on() {
    let w = World::new();
    let rt = ObjectRuntime::builder(NodeId::new("a").expect("valid"))
        .with_hot_store(Arc::new(FaultyHot::new(w.hot.clone())))
        .with_guard(Arc::new(w.hot.clone()))
        .with_cold_sink(Arc::new(w.cold.clone()))
        .with_accelerator(Arc::new(w.cold.clone()))
        .with_clock(Arc::new(w.clock.clone()))
        .with_settings(settings())
        .build()
        .expect("build runtime");
    let o = oid("o");
    assert_eq!(incr(&rt, &o).await.expect("incr"), 1);
    assert_eq!(incr(&rt, &o).await.expect("incr"), 2);
    let e = rt.evict(&o).await.expect_err("reply lost");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome);
    assert_eq!(incr(&rt, &o).await.expect("recovered from cold"), 3);
    assert_eq!(rt.metrics().activations, 2, "activated afresh");
}

/// With `keep_warm = 0` the lease goes back after every call, failed ones too: a commit that
/// failed (transiently) does not leave this node holding the object for a TTL.
#[tokio::test]
async fn a_failed_commit_with_keep_warm_zero_releases_the_lease() {
    let w = World::new();
    let hot = Arc::new(FaultyHot::new(w.hot.clone()));
    let rt = w.runtime_with_hot("a", hot.clone(), RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    let o = oid("o");
    assert_eq!(incr(&rt, &o).await.expect("incr"), 1);
    assert_eq!(w.hot.current(&o).await.expect("current"), None, "released after the call");
    hot.fail_writes.store(1, std::sync::atomic::Ordering::SeqCst);
    let e = incr(&rt, &o).await.expect_err("the commit fails");
    assert_eq!(e.kind(), &ErrorKind::Unavailable);
    assert_eq!(w.hot.current(&o).await.expect("current"), None, "released after the failed call too");
    let other = w.runtime("b", settings());
    assert_eq!(incr(&other, &o).await.expect("another node at once"), 2);
}

/// A renewal that never answers (a hung connection) does not keep the handler running past the
/// lease's expiry: the handler is self-fenced when the lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_renewal_self_fences_the_handler_at_expiry() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(settings());
    let o = oid("o");
    incr(&rt, &o).await.expect("activate");
    guard.hang_refreshes.store(true, std::sync::atomic::Ordering::SeqCst);
    let ticking = tick(&w);
    let call = rt.invoke(&o, async |t: &mut ObjectTxn<'_>| {
        t.put("k", "v")?;
        std::future::pending::<()>().await;
        Ok::<(), Error>(())
    });
    let r = tokio::time::timeout(Duration::from_secs(20), call).await;
    ticking.abort();
    let e = r.expect("the handler was stopped").expect_err("self-fenced");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
}

/// A drain whose lease ran out between two rounds never ships the new holder's changes under its
/// old token (cold fences committers, not record tokens: it would take them, and the new holder's
/// next activation would find its own change in cold under a lower token and refuse it as
/// `Corrupt` forever). The drain is fenced; the new holder drains its changes itself.
#[tokio::test]
async fn a_drain_never_ships_a_newer_holders_changes_under_its_old_token() {
    for flush_all in [false, true] {
        let w = World::new();
        let hot = Arc::new(FaultyHot::new(w.hot.clone()));
        let rt = w.runtime_with_hot("a", hot.clone(), RuntimeSettings { flush_batch_records: 2, ..settings() });
        let o = oid("o");
        for _ in 0..3 {
            incr(&rt, &o).await.expect("incr");
        }
        // After the first round (seqs 1 and 2) a's lease runs out and node b writes seq 4.
        let (inner, clock, o2) = (w.hot.clone(), w.clock.clone(), o.clone());
        *hot.after_truncate.lock() = Some(Box::pin(async move {
            clock.advance(TTL * 2);
            let l = inner.acquire(&o2, &NodeId::new("b").expect("valid"), TTL).await.expect("b takes over");
            inner.put(&o2, l.token, "T", "n", Bytes::from("from-b")).await.expect("b writes");
            inner.release(&l).await.expect("b releases");
        }));
        if flush_all {
            let r = rt.flush_all().await.expect("flush_all skips the object taken over");
            assert_eq!(r.records, 2, "{r:?}");
        } else {
            let e = rt.flush(&o).await.expect_err("a's lease is gone");
            assert!(e.is_fenced(), "{e}");
        }
        assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 2, "b's change stayed out of cold");
        let c = w.runtime("c", settings());
        assert_eq!(get(&c, &o, "n").await.expect("the object activates").as_deref(), Some(&b"from-b"[..]));
        c.flush(&o).await.expect("c drains a's seq 3 and b's seq 4");
        assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 4);
    }
}

/// A call cancelled while it activates the object (a request timeout around `invoke`, here
/// while cold storage does not answer) leaves no lease behind: the next call on this node gets
/// the object at once instead of `LeaseHeld` by itself until the lease expires.
#[tokio::test]
async fn a_call_cancelled_while_activating_leaves_no_lease_behind() {
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(settings());
    let o = oid("o");
    cold.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let cancelled = tokio::time::timeout(Duration::from_millis(50), incr(&rt, &o)).await;
    assert!(cancelled.is_err(), "the activation waits on cold storage");
    let held = w.hot.current(&o).await.expect("current").expect("the cancelled call took the lease");
    assert_eq!(held.holder.as_str(), "a");
    cold.hang.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(incr(&rt, &o).await.expect("the next call activates at once"), 1);
    assert_eq!(incr(&rt, &o).await.expect("and keeps the object"), 2);
    // A lease left behind for an object this node is not called for again is released by the
    // next maintenance round.
    let other = oid("other");
    cold.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let cancelled = tokio::time::timeout(Duration::from_millis(50), incr(&rt, &other)).await;
    assert!(cancelled.is_err());
    cold.hang.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(!w.hot.is_available(&other).await.expect("available"), "held by the cancelled call");
    rt.maintain().await.expect("maintain");
    assert!(w.hot.is_available(&other).await.expect("available"), "released by maintain");
}

/// A hot store "restored from an old backup": `o`'s key `n` written with `values` in turn (seqs
/// 1..), and a runtime "b" on it with the world's cold store behind a [`FlakyCold`].
async fn rolled_back_runtime(
    w: &World,
    o: &ObjectId,
    type_name: &str,
    values: &[&'static str],
) -> (MemoryBackend, Arc<FlakyCold>, ObjectRuntime) {
    rolled_back_runtime_over(w, o, type_name, values, false).await
}

/// Object `o` incremented `n` times by runtime "a" over `w`'s stores, flushed (cold holds seqs
/// `1..=n`), and the runtime shut down.
async fn cold_holds_increments(w: &World, n: u64) -> ObjectId {
    let a = w.runtime("a", settings());
    let o = oid("o");
    for _ in 0..n {
        incr(&a, &o).await.expect("incr");
    }
    a.flush(&o).await.expect("cold holds every increment");
    a.shutdown().await.expect("shutdown");
    o
}

/// [`rolled_back_runtime`]; with `paged`, the runtime's hot store answers one change per
/// `read_changes` ([`OneChangePerRead`]).
async fn rolled_back_runtime_over(
    w: &World,
    o: &ObjectId,
    type_name: &str,
    values: &[&'static str],
    paged: bool,
) -> (MemoryBackend, Arc<FlakyCold>, ObjectRuntime) {
    rolled_back_runtime_with(w, o, type_name, values, paged, settings()).await
}

/// [`rolled_back_runtime_over`] with the runtime's `settings`.
async fn rolled_back_runtime_with(
    w: &World,
    o: &ObjectId,
    type_name: &str,
    values: &[&'static str],
    paged: bool,
    settings: RuntimeSettings,
) -> (MemoryBackend, Arc<FlakyCold>, ObjectRuntime) {
    let rolled_back = MemoryBackend::with_clock(Arc::new(w.clock.clone()));
    let l = rolled_back.acquire(o, &NodeId::new("a").expect("valid"), TTL).await.expect("acquire");
    for v in values {
        rolled_back.put(o, l.token, type_name, "n", Bytes::from(*v)).await.expect("put");
    }
    rolled_back.release(&l).await.expect("release");
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    let hot: Arc<dyn HotStore> =
        if paged { Arc::new(OneChangePerRead(rolled_back.clone())) } else { Arc::new(rolled_back.clone()) };
    let rt = ObjectRuntime::builder(NodeId::new("b").expect("valid"))
        .with_hot_store(hot)
        .with_guard(Arc::new(rolled_back.clone()))
        .with_cold_sink(cold.clone())
        .with_clock(Arc::new(w.clock.clone()))
        .with_settings(settings)
        .build()
        .expect("build runtime");
    (rolled_back, cold, rt)
}

/// A hot store that answers at most one change per `read_changes` (as a backend bounding its
/// answers may): every other call goes to the memory backend.
#[derive(Debug)]
struct OneChangePerRead(MemoryBackend);

#[async_trait::async_trait]
impl HotStore for OneChangePerRead {
    async fn write(&self, object: &ObjectId, token: FencingToken, batch: WriteBatch) -> Result<WriteReceipt> {
        self.0.write(object, token, batch).await
    }
    async fn get(&self, object: &ObjectId, key: &str) -> Result<Option<Bytes>> {
        self.0.get(object, key).await
    }
    async fn list(&self, object: &ObjectId, range: KeyRange, limit: Option<usize>) -> Result<Vec<Entry>> {
        self.0.list(object, range, limit).await
    }
    async fn read_changes(&self, object: &ObjectId, after: Seq, limit: usize) -> Result<Vec<ChangeRecord>> {
        self.0.read_changes(object, after, limit.min(1)).await
    }
    async fn truncate_changes(&self, object: &ObjectId, token: FencingToken, through: Seq) -> Result<()> {
        self.0.truncate_changes(object, token, through).await
    }
    async fn object_info(&self, object: &ObjectId) -> Result<Option<ObjectInfo>> {
        self.0.object_info(object).await
    }
    async fn objects_with_pending_changes(&self, after: Option<&ObjectId>, limit: usize) -> Result<Vec<ObjectId>> {
        self.0.objects_with_pending_changes(after, limit).await
    }
    async fn evict(&self, object: &ObjectId, token: FencingToken) -> Result<()> {
        self.0.evict(object, token).await
    }
    async fn restore(&self, object: &ObjectId, token: FencingToken, entries: Vec<Entry>, through: Seq) -> Result<()> {
        self.0.restore(object, token, entries, through).await
    }
}

/// A hot store restored from an old backup (two pending changes, the same cold has) while cold
/// holds 300 more: activation compares the two with cold's first two, reading no more of cold
/// (it used to read cold's whole tail after them), then restores the object from cold.
#[tokio::test]
async fn activation_reads_only_the_cold_changes_it_compares() {
    let w = World::new();
    let a = w.runtime("a", settings());
    let o = oid("o");
    for _ in 0..302 {
        incr(&a, &o).await.expect("incr");
    }
    a.flush(&o).await.expect("cold has seqs 1..302");
    a.shutdown().await.expect("shutdown");
    let (_rolled_back, cold, rt) = rolled_back_runtime(&w, &o, "Object", &["1", "2"]).await;
    assert_eq!(get(&rt, &o, "n").await.expect("restored from cold"), Some(Bytes::from("302")));
    assert_eq!(cold.most_changes_read.load(std::sync::atomic::Ordering::SeqCst), 2, "cold's changes 1 and 2 only");
}

/// A drain never truncates hot changes that cold skipped as replays when cold holds different
/// changes at those sequence numbers: a hot store rolled back behind cold, activated while cold
/// was unreachable, and written again must not lose those writes as "replays". `Corrupt`, and
/// hot keeps them; and nothing of them reaches cold (the write past cold's last change was
/// committed to cold before the divergence showed, and later drains added to it). Also with a
/// hot store answering one change per read: the check reads on past a short answer (a first
/// change that matches cold's does not end it).
#[tokio::test]
async fn a_drain_refuses_to_drop_writes_that_differ_from_what_cold_skipped() {
    for paged in [false, true] {
        drain_refuses_to_drop_differing_writes(paged).await;
    }
}

async fn drain_refuses_to_drop_differing_writes(paged: bool) {
    let w = World::new();
    let o = cold_holds_increments(&w, 3).await;
    // The hot store comes back from an old backup: only seq 1.
    let (rolled_back, cold, rt) = rolled_back_runtime_over(&w, &o, "T", &["1"], paged).await;
    // Cold is unreachable while the object activates: it runs from hot alone.
    cold.down.store(true, std::sync::atomic::Ordering::SeqCst);
    rt.invoke(&o, async |t: &mut ObjectTxn<'_>| {
        t.put("x", "1")?;
        t.put("y", "2")?;
        t.put("z", "3")
    })
    .await
    .expect("acknowledged");
    cold.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let e = rt.flush(&o).await.expect_err("cold holds other changes at seqs 2 and 3");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "paged {paged}: {e}");
    assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 3, "paged {paged}: seq 4 reached cold");
    // Calls go on in hot; their changes do not reach cold either.
    rt.invoke(&o, async |t: &mut ObjectTxn<'_>| t.put("w", "4")).await.expect("a call on hot state");
    let e = rt.flush(&o).await.expect_err("still diverged");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "paged {paged}: {e}");
    assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 3, "paged {paged}: seq 5 reached cold");
    let info = rolled_back.object_info(&o).await.expect("info").expect("object");
    assert_eq!(info.truncated_through, 0, "nothing truncated");
    assert_eq!(rolled_back.get(&o, "x").await.expect("get").as_deref(), Some(&b"1"[..]));
    assert_eq!(rolled_back.get(&o, "y").await.expect("get").as_deref(), Some(&b"2"[..]));
    // flush_all drains the healthy objects in the same commits and still reports the diverged one.
    let healthy = oid("healthy");
    incr(&rt, &healthy).await.expect("incr");
    let e = rt.flush_all().await.expect_err("the diverged object is reported");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert_eq!(rolled_back.object_info(&o).await.expect("info").expect("object").truncated_through, 0);
    assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 3, "flush_all committed the diverged object's changes");
    let info = rolled_back.object_info(&healthy).await.expect("info").expect("object");
    assert!(!info.has_pending_changes(), "the healthy object was drained and truncated: {info:?}");
    assert_eq!(w.cold.watermark(&healthy).await.expect("wm").through, 1);
}

/// The diverged writes of `drain_refuses_to_drop_differing_writes` reach cold through no other
/// drain either: a call's automatic flush (the call answers `Ok`, its flush failing) and an
/// evict (`Corrupt`, nothing evicted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverged_objects_writes_reach_cold_through_no_drain() {
    for evict in [false, true] {
        let w = World::new();
        let o = cold_holds_increments(&w, 3).await;
        let auto = RuntimeSettings { flush_after_changes: 1, ..settings() };
        let (rolled_back, cold, rt) = rolled_back_runtime_with(&w, &o, "T", &["1"], false, auto).await;
        cold.down.store(true, std::sync::atomic::Ordering::SeqCst);
        // (Bounded in real time, on a task of its own: a flush that goes on to commit waits for
        // a cold store that is down, retrying on this manual clock, and never comes back.)
        let (rt1, o1) = (rt.clone(), o.clone());
        let call = tokio::spawn(async move {
            rt1.invoke(&o1, async |t: &mut ObjectTxn<'_>| {
                t.put("x", "1")?;
                t.put("y", "2")?;
                t.put("z", "3")
            })
            .await
        });
        let done = tokio::time::timeout(Duration::from_secs(30), call).await;
        done.expect("the call's flush stopped before committing anything").expect("task").expect("acknowledged");
        cold.down.store(false, std::sync::atomic::Ordering::SeqCst);
        if evict {
            let e = rt.evict(&o).await.expect_err("diverged");
            assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
            assert!(rolled_back.get(&o, "z").await.expect("get").is_some(), "nothing evicted");
        } else {
            // Past the automatic flush's pause (1 s) after its failure while cold was down, well
            // within the lease (the activation stays: a new one would stop with `Corrupt`).
            w.clock.advance(Duration::from_secs(2));
            // (Bounded in real time, on a task of its own: a drain that commits the diverged
            // writes does not come back here.)
            let (rt2, o2) = (rt.clone(), o.clone());
            let call =
                tokio::spawn(async move { rt2.invoke(&o2, async |t: &mut ObjectTxn<'_>| t.put("w", "4")).await });
            let done = tokio::time::timeout(Duration::from_secs(30), call).await;
            done.expect("the call's flush stopped before committing anything")
                .expect("task")
                .expect("the call commits");
        }
        assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 3, "evict {evict}: a diverged write reached cold");
    }
}

/// A hot store rolled back behind cold with nothing left to drain (its last change, seq 1, was
/// drained: cold holds 1..3), activated while cold was unreachable: once cold is back, a flush
/// of the still-active object finds the hot store behind cold and gives the activation up (the
/// next one restores from cold), so new writes continue after cold's seq 3. (It took the object
/// as verified, its next writes reused seqs 2 and 3, and the write at seq 4 reached cold on top
/// of cold's own.)
#[tokio::test]
async fn an_object_behind_cold_with_nothing_pending_is_restored_before_it_writes() {
    let w = World::new();
    let o = cold_holds_increments(&w, 3).await;
    let (rolled_back, cold, rt) = rolled_back_runtime_over(&w, &o, "T", &["1"], false).await;
    let l = rolled_back.acquire(&o, &NodeId::new("z").expect("node"), TTL).await.expect("acquire");
    rolled_back.truncate_changes(&o, l.token, 1).await.expect("seq 1 was drained");
    rolled_back.release(&l).await.expect("release");
    cold.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let read = rt.invoke(&o, async |t: &mut ObjectTxn<'_>| t.get("n").await).await.expect("a read from hot");
    assert_eq!(read.as_deref(), Some(&b"1"[..]), "the rolled-back state");
    cold.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let e = rt.flush(&o).await.expect_err("the hot store is behind cold");
    assert!(e.is_retryable(), "the next activation restores: {e}");
    for _ in 0..3 {
        incr(&rt, &o).await.expect("incr after a restore from cold");
    }
    rt.flush(&o).await.expect("flush");
    assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 6);
    assert_eq!(
        rt.invoke(&o, async |t: &mut ObjectTxn<'_>| t.get("n").await).await.expect("read").as_deref(),
        Some(&b"6"[..])
    );
}

/// A hot store rolled back behind cold (a backup holding seqs 1..2 of cold's 1..5, the same
/// changes), activated while cold was unreachable: its flush re-sends 1..2, which cold skips,
/// and cold's watermark (5) is past the hot store's last change. The flush is refused with
/// `Conflict` (not an `InvalidInput` truncation failing every flush, `flush_all` included),
/// the activation is given up, and the next call restores the object from cold.
#[tokio::test]
async fn a_flush_finding_the_hot_store_behind_cold_gives_up_the_activation() {
    for all in [false, true] {
        let w = World::new();
        let o = cold_holds_increments(&w, 5).await;
        let (rolled_back, cold, rt) = rolled_back_runtime(&w, &o, "Object", &["1", "2"]).await;
        cold.down.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(get(&rt, &o, "n").await.expect("runs from hot alone"), Some(Bytes::from("2")));
        cold.down.store(false, std::sync::atomic::Ordering::SeqCst);
        let healthy = oid("healthy");
        incr(&rt, &healthy).await.expect("incr");
        let e = if all {
            let e = rt.flush_all().await.expect_err("the object behind cold is reported");
            assert_eq!(w.cold.watermark(&healthy).await.expect("wm").through, 1, "the others are drained");
            e
        } else {
            rt.flush(&o).await.expect_err("behind cold")
        };
        assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
        assert!(e.is_retryable(), "the next activation restores from cold: a retry succeeds: {e}");
        assert_eq!(rolled_back.current(&o).await.expect("current"), None, "the activation's lease is given back");
        assert_eq!(incr(&rt, &o).await.expect("restored from cold on the next call"), 6);
        rt.flush(&o).await.expect("flushes again");
        assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 6);
    }
}

/// An eviction the hot store refuses (`Conflict`) of an object activated only for it gives the
/// lease back: kept warm, it refused the owner's calls for `keep_warm`.
#[tokio::test]
async fn a_refused_eviction_gives_back_a_lease_taken_only_for_it() {
    let w = World::new();
    let o = oid("o");
    let b = w.runtime("b", RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    assert_eq!(incr(&b, &o).await.expect("b's call, released after it"), 1);
    let hot = Arc::new(FaultyHot::new(w.hot.clone()));
    hot.refuse_evicts.store(true, std::sync::atomic::Ordering::SeqCst);
    let a = w.runtime_with_hot("a", hot.clone(), settings());
    let e = a.evict(&o).await.expect_err("refused");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert!(w.hot.is_available(&o).await.expect("available"), "the lease taken to evict went back");
    assert_eq!(incr(&b, &o).await.expect("the owner goes on"), 2);
}

/// A warm lease that lapsed because nothing renewed it (no `maintain`, `keep_warm` longer than
/// the TTL) does not make `flush_all` or `shutdown` skip the object's changes: it takes the object
/// again and drains it; an object another node holds now is left to that node.
#[tokio::test]
async fn flush_all_retakes_a_lapsed_warm_lease_and_drains_it() {
    let w = World::new();
    let rt = w.runtime("a", settings());
    incr(&rt, &oid("idle")).await.expect("incr");
    rt.flush(&oid("idle")).await.expect("nothing pending any more");
    incr(&rt, &oid("lapsed")).await.expect("incr");
    incr(&rt, &oid("taken")).await.expect("incr");
    w.clock.advance(TTL + Duration::from_millis(1));
    let b = w.hot.acquire(&oid("taken"), &NodeId::new("b").expect("valid"), TTL).await.expect("b takes one");
    let r = rt.flush_all().await.expect("flush_all");
    assert_eq!((r.records, r.objects), (1, 1), "{r:?}");
    assert!(w.hot.is_available(&oid("idle")).await.expect("available"), "nothing to drain: not retaken");
    assert!(!w.hot.is_available(&oid("lapsed")).await.expect("available"), "retaken to drain");
    let r = rt.shutdown().await.expect("shutdown");
    assert_eq!(r.records, 0, "{r:?}");
    assert_eq!(w.cold.watermark(&oid("lapsed")).await.expect("wm").through, 1);
    assert_eq!(w.cold.watermark(&oid("taken")).await.expect("wm").through, 0, "left to b");
    assert!(w.hot.is_available(&oid("lapsed")).await.expect("available"), "released at shutdown");
    assert_eq!(w.hot.current(&oid("taken")).await.expect("current"), Some(b));
}

/// The same under a guard whose lease check does not answer at once (SQLite's blocking task,
/// a remote libSQL call): the lapsed lease goes straight to being taken again. Its check raced
/// a zero-length timer (the time the lapsed lease had left), which won: the object was left
/// out and every `flush_all`, and shutdown, failed without draining it.
#[tokio::test]
async fn flush_all_retakes_a_lapsed_warm_lease_under_a_guard_that_answers_later() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(settings());
    guard.yielding_validates.store(true, std::sync::atomic::Ordering::SeqCst);
    incr(&rt, &oid("lapsed")).await.expect("incr");
    w.clock.advance(TTL + Duration::from_millis(1));
    let r = rt.flush_all().await.expect("flush_all");
    assert_eq!((r.records, r.objects), (1, 1), "{r:?}");
    assert_eq!(w.cold.watermark(&oid("lapsed")).await.expect("wm").through, 1);
    incr(&rt, &oid("lapsed")).await.expect("incr");
    w.clock.advance(TTL + Duration::from_millis(1));
    let r = rt.shutdown().await.expect("shutdown");
    assert_eq!(r.records, 1, "{r:?}");
    assert_eq!(w.cold.watermark(&oid("lapsed")).await.expect("wm").through, 2);
}

/// A warm lease the runtime counts as run out (from when it sent the acquire) while the guard
/// still holds it for this node (granted later, a round trip or a clock skew): `flush_all`
/// gives it back and takes the object again, and drains it. The refusal naming this very node
/// was taken for another holder's: the flush answered `Ok` with the changes left in hot
/// storage. A lease another runtime under the same node id holds (another token) is left to it.
#[tokio::test]
async fn flush_all_retakes_a_lapsed_lease_the_guard_still_holds_for_this_node() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(settings());
    *guard.slow_acquires.lock() = Some((w.clock.clone(), Duration::from_secs(2)));
    incr(&rt, &oid("o")).await.expect("incr");
    *guard.slow_acquires.lock() = None;
    // Run out here (TTL after sending), still held at the guard (TTL after granting).
    w.clock.advance(TTL - Duration::from_secs(1));
    assert!(!w.hot.is_available(&oid("o")).await.expect("available"), "still held at the guard");
    let r = rt.flush_all().await.expect("flush_all");
    assert_eq!(r.records, 1, "{r:?}");
    assert_eq!(w.cold.watermark(&oid("o")).await.expect("wm").through, 1);
    // Another runtime under this node id takes the object once this one's lease ran out.
    incr(&rt, &oid("o")).await.expect("incr");
    w.clock.advance(TTL + Duration::from_secs(1));
    let twin = w.runtime("a", settings());
    assert_eq!(incr(&twin, &oid("o")).await.expect("the twin's call"), 3);
    let r = rt.flush_all().await.expect("the twin's object is left to it");
    assert_eq!(r.records, 0, "{r:?}");
    assert_eq!(twin.flush_all().await.expect("the twin drains").records, 2);
}

/// The same when the guard's lease runs out between the refusal and the lookup (the lookup
/// finds no lease): the object is taken again and drained, not skipped as another runtime's
/// (with `drain_released` off, no later pass of the flush picked it up).
#[tokio::test]
async fn flush_all_retakes_a_lapsed_lease_that_runs_out_at_the_guard_meanwhile() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(RuntimeSettings { drain_released: false, ..settings() });
    *guard.slow_acquires.lock() = Some((w.clock.clone(), Duration::from_secs(2)));
    incr(&rt, &oid("o")).await.expect("incr");
    *guard.slow_acquires.lock() = None;
    w.clock.advance(TTL - Duration::from_secs(1));
    *guard.slow_currents.lock() = Some((w.clock.clone(), Duration::from_secs(2)));
    let r = rt.flush_all().await.expect("flush_all");
    *guard.slow_currents.lock() = None;
    assert_eq!(r.records, 1, "{r:?}");
    assert_eq!(w.cold.watermark(&oid("o")).await.expect("wm").through, 1);
}

/// A call cancelled while its acquire was in flight (the acquire landed, the caller's timeout
/// fired before the reply) does not lock this node out of the object until the lease expires:
/// the next call adopts the lease, and `maintain` gives back one no call came back for.
#[tokio::test]
async fn a_call_cancelled_while_acquiring_does_not_lock_this_node_out() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(settings());
    let (o, other) = (oid("o"), oid("other"));
    guard.hang_acquires.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(tokio::time::timeout(Duration::from_millis(50), incr(&rt, &o)).await.is_err(), "the acquire hangs");
    assert!(tokio::time::timeout(Duration::from_millis(50), incr(&rt, &other)).await.is_err());
    guard.hang_acquires.store(false, std::sync::atomic::Ordering::SeqCst);
    let held = w.hot.current(&o).await.expect("current").expect("the cancelled acquire landed");
    assert_eq!(held.holder.as_str(), "a");
    w.clock.advance(Duration::from_millis(10));
    assert_eq!(incr(&rt, &o).await.expect("the next call adopts the lease"), 1);
    assert_eq!(w.hot.current(&o).await.expect("current").expect("held").token, held.token, "adopted, not re-taken");
    assert!(!w.hot.is_available(&other).await.expect("available"), "held by the cancelled acquire");
    rt.maintain().await.expect("maintain");
    assert!(w.hot.is_available(&other).await.expect("available"), "given back by maintain");
    assert!(!w.hot.is_available(&o).await.expect("available"), "the adopted lease is kept");
    assert_eq!(incr(&rt, &o).await.expect("still active"), 2);
}

/// A lease check that fails for a passing reason on one object leaves that object out of
/// `flush_all` (and of shutdown's flush), not the others: the whole flush stopped at it, and a
/// shutdown drained nothing. The failure is returned at the end; the next flush drains the rest.
#[tokio::test]
async fn a_passing_guard_failure_on_one_object_does_not_stop_the_whole_flush() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(settings());
    let (a, b) = (oid("a"), oid("b"));
    for o in [&a, &b] {
        assert_eq!(incr(&rt, o).await.expect("write"), 1);
    }
    guard.fail_validates.store(1, std::sync::atomic::Ordering::SeqCst);
    let e = rt.flush_all().await.expect_err("a's lease was not checked");
    assert!(e.is_retryable(), "{e}");
    assert_eq!(w.cold.watermark(&a).await.expect("wm").through, 0, "a left out");
    assert_eq!(w.cold.watermark(&b).await.expect("wm").through, 1, "b drained all the same");
    assert_eq!(incr(&rt, &a).await.expect("a stays active"), 2);
    assert_eq!(incr(&rt, &b).await.expect("b stays active"), 2);
    guard.fail_validates.store(1, std::sync::atomic::Ordering::SeqCst);
    rt.shutdown().await.expect_err("a's lease was not checked");
    assert_eq!(w.cold.watermark(&a).await.expect("wm").through, 0, "a left out");
    assert_eq!(w.cold.watermark(&b).await.expect("wm").through, 2, "b drained at shutdown all the same");
    let c = w.runtime("c", settings());
    assert_eq!(c.flush_all().await.expect("a's changes wait in hot storage").records, 2);
    assert_eq!(w.cold.watermark(&a).await.expect("wm").through, 2);
}

/// Guard calls `flush_all`, shutdown and `maintain` make while holding an object's slot end
/// once a lease TTL has passed when the guard never answers (a hung connection): a lease check,
/// a lookup settling an acquire of unknown outcome, an acquire. Each waited for ever, holding
/// the slot (every call on the object waited too), and shutdown never returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the clock ticks while the calls wait
async fn hung_guard_calls_made_holding_a_slot_end_after_a_ttl() {
    let (w, guard, rt, o) = activated_under_a_flaky_guard().await;
    let ended = |task: tokio::task::JoinHandle<Result<()>>| async {
        let ticking = tick(&w);
        let ended = tokio::time::timeout(Duration::from_secs(10), task).await;
        ticking.abort();
        ended.expect("ends once a TTL has passed").expect("join")
    };
    // A lease check in `flush_all`, then in shutdown's flush.
    guard.hang_validates.store(true, std::sync::atomic::Ordering::SeqCst);
    let rt2 = rt.clone();
    let e = ended(tokio::spawn(async move { rt2.flush_all().await.map(|_| ()) })).await.expect_err("not checked");
    assert!(e.is_retryable(), "{e}");
    guard.hang_validates.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(incr(&rt, &o).await.expect("calls go on"), 2);
    // An acquire that lands and never answers: given up on after a TTL, its outcome remembered.
    let p = oid("p");
    guard.hang_acquires.store(true, std::sync::atomic::Ordering::SeqCst);
    let rt2 = rt.clone();
    let p2 = p.clone();
    let e = ended(tokio::spawn(async move { incr(&rt2, &p2).await.map(|_| ()) })).await.expect_err("no answer");
    assert!(e.is_retryable(), "{e}");
    guard.hang_acquires.store(false, std::sync::atomic::Ordering::SeqCst);
    // The lookup settling it in `maintain` hangs too: `maintain` ends all the same.
    guard.hang_currents.store(true, std::sync::atomic::Ordering::SeqCst);
    let rt2 = rt.clone();
    let before = w.clock.monotonic();
    ended(tokio::spawn(async move { rt2.maintain().await })).await.expect("maintain");
    assert!(w.clock.monotonic() - before >= TTL, "maintain asked the guard, and waited a TTL");
    guard.hang_currents.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(incr(&rt, &p).await.expect("calls go on"), 1);
    guard.hang_validates.store(true, std::sync::atomic::Ordering::SeqCst);
    let rt2 = rt.clone();
    let e = ended(tokio::spawn(async move { rt2.shutdown().await.map(|_| ()) })).await.expect_err("not checked");
    assert!(e.is_retryable(), "{e}");
}

/// A shutdown (or `flush_all`) of many warm objects under a guard that stops answering (a hung
/// connection) asks it once, not once per object: after the first call of its pass goes
/// unanswered for a TTL, the other objects are left out (`Unavailable`, their changes in hot
/// storage) without asking. Each held object's lease check, then (the leases run out meanwhile)
/// each one's acquire to take it again, waited a TTL: about 2 x 12 TTLs here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the clock ticks while the calls wait
async fn a_shutdown_under_a_guard_that_stops_answering_asks_it_once() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(settings());
    let objects: Vec<ObjectId> = (0..12).map(|i| oid(&format!("o{i}"))).collect();
    for o in &objects {
        assert_eq!(incr(&rt, o).await.expect("warm, one change pending"), 1);
    }
    guard.hang_validates.store(true, std::sync::atomic::Ordering::SeqCst);
    guard.hang_acquires.store(true, std::sync::atomic::Ordering::SeqCst);
    let before = w.clock.monotonic();
    let ticking = tick(&w);
    let rt2 = rt.clone();
    let ended = tokio::time::timeout(Duration::from_secs(60), tokio::spawn(async move { rt2.shutdown().await })).await;
    ticking.abort();
    let e = ended.expect("shutdown ends").expect("join").expect_err("nothing drained");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    let took = w.clock.monotonic() - before;
    assert!(took < TTL * 4, "shutdown took {took:?} (TTL {TTL:?}) for {} objects", objects.len());
    for o in &objects {
        assert_eq!(w.cold.watermark(o).await.expect("wm").through, 0, "left in hot storage");
        assert_eq!(w.hot.read_changes(o, 0, 10).await.expect("hot").len(), 1, "its change waits in hot storage");
    }
}

/// A `flush_all` that took released objects to drain them, under a guard whose releases stop
/// answering, gives back the first lease (a TTL unanswered) and leaves the others' for later
/// without asking: each release waited a TTL, eight TTLs here. Everything is drained, and the
/// leases left behind are released once the guard answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the clock ticks while the calls wait
async fn a_flush_whose_releases_stop_answering_waits_for_one() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    let objects: Vec<ObjectId> = (0..8).map(|i| oid(&format!("o{i}"))).collect();
    for o in &objects {
        assert_eq!(incr(&rt, o).await.expect("released after the call, its change pending"), 1);
    }
    guard.hang_releases.store(true, std::sync::atomic::Ordering::SeqCst);
    let before = w.clock.monotonic();
    let ticking = tick(&w);
    let rt2 = rt.clone();
    let flushed =
        tokio::time::timeout(Duration::from_secs(60), tokio::spawn(async move { rt2.flush_all().await })).await;
    ticking.abort();
    let report = flushed.expect("the flush ends").expect("join").expect("drained");
    assert_eq!(report.objects, objects.len() as u64, "{report:?}");
    let took = w.clock.monotonic() - before;
    assert!(took < TTL * 3, "the flush took {took:?} (TTL {TTL:?})");
    for o in &objects {
        assert_eq!(w.cold.watermark(o).await.expect("wm").through, 1, "{o} drained");
    }
    guard.hang_releases.store(false, std::sync::atomic::Ordering::SeqCst);
    rt.maintain().await.expect("maintain releases what was left");
    for o in &objects {
        assert_eq!(w.hot.current(o).await.expect("current"), None, "{o}: released");
    }
}

/// The same over more than one page of released objects: once a release of the first page's
/// leases goes unanswered, the flush stops (the next pages are not read only to be left out)
/// and fails (`Unavailable`) rather than answer `Ok` with the later pages' changes undrained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the clock ticks while the calls wait
async fn a_flush_stopped_by_an_unanswered_release_does_not_answer_ok() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    let objects: Vec<ObjectId> = (0..300).map(|i| oid(&format!("o{i:03}"))).collect();
    for o in &objects {
        incr(&rt, o).await.expect("released after the call, its change pending");
    }
    guard.hang_releases.store(true, std::sync::atomic::Ordering::SeqCst);
    let ticking = tick(&w);
    let rt2 = rt.clone();
    let flushed =
        tokio::time::timeout(Duration::from_secs(60), tokio::spawn(async move { rt2.flush_all().await })).await;
    ticking.abort();
    let e = flushed.expect("the flush ends").expect("join").expect_err("a later page was not drained");
    assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Unavailable, true), "{e}");
    let mut drained = 0;
    for o in &objects {
        drained += w.cold.watermark(o).await.expect("wm").through;
    }
    assert!(drained < objects.len() as u64, "{drained} of {} drained", objects.len());
}

/// An acquire whose outcome is unknown adopts only a lease granted to this node since it began:
/// an older lease under the same node id is another runtime's (node ids need not be unique), and
/// sharing its token would defeat fencing.
#[tokio::test]
async fn an_ambiguous_acquire_never_adopts_an_older_lease_of_the_same_node_id() {
    let w = World::new();
    let first = w.runtime("a", settings());
    let o = oid("o");
    assert_eq!(incr(&first, &o).await.expect("first"), 1);
    w.clock.advance(Duration::from_secs(1));
    let guard = Arc::new(FlakyGuard::new(&w));
    let second = w.runtime_with("a", guard.clone(), Arc::new(w.cold.clone()), settings());
    guard.refused_ambiguous_acquires.store(1, std::sync::atomic::Ordering::SeqCst);
    let e = incr(&second, &o).await.expect_err("the lease is the first runtime's");
    assert!(matches!(e.kind(), ErrorKind::LeaseHeld { .. }), "{e}");
    assert_eq!(guard.refused_ambiguous_acquires.load(std::sync::atomic::Ordering::SeqCst), 0);
    second.maintain().await.expect("maintain");
    assert!(!w.hot.is_available(&o).await.expect("available"), "the first runtime's lease is not given back");
    assert_eq!(incr(&first, &o).await.expect("the first runtime keeps the object"), 2);
}

/// A held object whose lease runs out during a long `flush_all` (its first commit took longer
/// than the TTL) is not drained, and the flush says so (`Err`): it answered `Ok` while that
/// object's acknowledged changes waited in hot storage.
#[tokio::test]
async fn a_lease_run_out_during_flush_all_fails_the_flush() {
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(RuntimeSettings { flush_batch_records: 1, ..settings() });
    let (a, b) = (oid("a"), oid("b"));
    incr(&rt, &a).await.expect("a");
    incr(&rt, &b).await.expect("b");
    // The first commit takes longer than the TTL (on the runtime's clock).
    let clock = w.clock.clone();
    *cold.before_append.lock() = Some(Box::pin(async move { clock.advance(TTL * 2) }));
    let e = rt.flush_all().await.expect_err("one object's lease ran out before its commit");
    assert!(e.to_string().contains("the lease ran out during the flush"), "{e}");
    let pending: Vec<u64> = futures::future::join_all([&a, &b].map(|o| w.cold.watermark(o)))
        .await
        .into_iter()
        .map(|wm| wm.expect("watermark").through)
        .collect();
    assert_eq!(pending.iter().filter(|t| **t == 0).count(), 1, "one object left in hot storage: {pending:?}");
}

/// The same with `drain_released` off: the object left out (given back undrained) is owed to
/// the next `flush_all`, which takes it again and drains it, and so does `shutdown`'s flush.
/// The next `flush_all` and `shutdown` answered `Ok` with its acknowledged change left in hot
/// storage (nothing drains a released object with `drain_released` off).
#[tokio::test]
async fn an_object_left_out_of_a_flush_is_drained_by_the_next_one_without_drain_released() {
    for via_shutdown in [false, true] {
        let w = World::new();
        let (cold, rt) =
            w.flaky_cold_runtime(RuntimeSettings { flush_batch_records: 1, drain_released: false, ..settings() });
        let (a, b) = (oid("a"), oid("b"));
        incr(&rt, &a).await.expect("a");
        incr(&rt, &b).await.expect("b");
        let clock = w.clock.clone();
        *cold.before_append.lock() = Some(Box::pin(async move { clock.advance(TTL * 2) }));
        rt.flush_all().await.expect_err("one object's lease ran out before its commit");
        let left: Vec<ObjectId> = futures::future::join_all([&a, &b].map(|o| w.cold.watermark(o)))
            .await
            .into_iter()
            .zip([&a, &b])
            .filter(|(wm, _)| wm.as_ref().expect("watermark").through == 0)
            .map(|(_, o)| o.clone())
            .collect();
        assert_eq!(left.len(), 1, "one object left in hot storage");
        if via_shutdown {
            rt.shutdown().await.expect("shutdown drains it");
        } else {
            let report = rt.flush_all().await.expect("the next flush drains it");
            assert_eq!(report.objects, 1, "{report:?}");
        }
        assert_eq!(w.cold.watermark(&left[0]).await.expect("watermark").through, 1, "shutdown: {via_shutdown}");
        let info = w.hot.object_info(&left[0]).await.expect("info").expect("object");
        assert!(!info.has_pending_changes(), "{info:?}");
        if !via_shutdown {
            assert_eq!(rt.flush_all().await.expect("nothing owed now").objects, 0);
        }
    }
}

/// The same, the object left out because cold refused its records (a refusal about it alone),
/// and the flush dropped (a host's timeout) while its release hangs: the object is still owed,
/// and once cold takes its records the next `flush_all` (or `shutdown`) drains it. It was owed
/// only once the release answered: dropped during it, the object was neither held nor owed, and
/// every later flush answered `Ok` with its acknowledged change in hot storage.
#[tokio::test]
async fn an_object_left_out_of_a_flush_dropped_during_its_release_is_still_owed() {
    for via_shutdown in [false, true] {
        let w = World::new();
        let guard = Arc::new(FlakyGuard::new(&w));
        let cold = Arc::new(FlakyCold::new(w.cold.clone()));
        let rt =
            w.runtime_with("a", guard.clone(), cold.clone(), RuntimeSettings { drain_released: false, ..settings() });
        let (a, b) = (oid("a"), oid("b"));
        incr(&rt, &a).await.expect("a");
        incr(&rt, &b).await.expect("b");
        *cold.refused_object.lock() = Some(a.clone());
        guard.hang_releases.store(true, std::sync::atomic::Ordering::SeqCst);
        let dropped = tokio::time::timeout(Duration::from_millis(200), rt.flush_all()).await;
        assert!(dropped.is_err(), "the left-out object's release hangs: {dropped:?}");
        assert_eq!(guard.hung_releases.load(std::sync::atomic::Ordering::SeqCst), 1, "a's release, the only one");
        guard.hang_releases.store(false, std::sync::atomic::Ordering::SeqCst);
        *cold.refused_object.lock() = None;
        assert_eq!(w.cold.watermark(&a).await.expect("watermark").through, 0, "left out");
        assert_eq!(w.cold.watermark(&b).await.expect("watermark").through, 1, "drained");
        if via_shutdown {
            rt.shutdown().await.expect("shutdown drains it");
        } else {
            let report = rt.flush_all().await.expect("the next flush drains it");
            assert_eq!(report.objects, 1, "{report:?}");
        }
        assert_eq!(w.cold.watermark(&a).await.expect("watermark").through, 1, "shutdown: {via_shutdown}");
        let info = w.hot.object_info(&a).await.expect("info").expect("object");
        assert!(!info.has_pending_changes(), "{info:?}");
    }
}

/// A `flush_all` dropped (a host's timeout) while it takes a lapsed warm object again (its
/// acquire hangs): with `drain_released` off the object is owed to the next flush, which drains
/// it. The lapsed activation was dropped with the flush, the object neither active here nor
/// owed, and every later flush answered `Ok` with its acknowledged change in hot storage.
#[tokio::test]
async fn a_flush_dropped_while_retaking_a_lapsed_object_leaves_it_owed() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(RuntimeSettings { drain_released: false, ..settings() });
    let x = oid("x");
    assert_eq!(incr(&rt, &x).await.expect("incr"), 1);
    // No `maintain` renews it: the warm lease lapses.
    w.clock.advance(TTL * 2);
    guard.hang_acquires.store(true, std::sync::atomic::Ordering::SeqCst);
    let dropped = tokio::time::timeout(Duration::from_millis(200), rt.flush_all()).await;
    assert!(dropped.is_err(), "the retake's acquire hangs: {dropped:?}");
    guard.hang_acquires.store(false, std::sync::atomic::Ordering::SeqCst);
    let report = rt.flush_all().await.expect("the next flush drains it");
    assert_eq!(report.objects, 1, "{report:?}");
    assert_eq!(w.cold.watermark(&x).await.expect("watermark").through, 1);
    let info = w.hot.object_info(&x).await.expect("info").expect("object");
    assert!(!info.has_pending_changes(), "{info:?}");
    assert_eq!(incr(&rt, &x).await.expect("the object is usable after"), 2);
}

/// The same with the lapsed lease still current at the guard (it granted the lease later than
/// the runtime counts from, a slow acquire): the flush dropped while it asks the guard whose the
/// lease is leaves the lapsed lease for `maintain` to give back, so the object is free at once,
/// not when the guard's lease expires, and the next flush drains it.
#[tokio::test]
async fn a_flush_dropped_while_retaking_a_lapsed_object_leaves_its_lease_to_maintain() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(RuntimeSettings { drain_released: false, ..settings() });
    let x = oid("x");
    *guard.slow_acquires.lock() = Some((w.clock.clone(), TTL / 2));
    assert_eq!(incr(&rt, &x).await.expect("incr"), 1);
    *guard.slow_acquires.lock() = None;
    // Run out as the runtime counts (from sending the acquire), current at the guard.
    w.clock.advance(TTL - TTL / 4);
    assert!(!w.hot.is_available(&x).await.expect("available"), "still current at the guard");
    guard.hang_currents.store(true, std::sync::atomic::Ordering::SeqCst);
    let dropped = tokio::time::timeout(Duration::from_millis(200), rt.flush_all()).await;
    assert!(dropped.is_err(), "the lease lookup hangs: {dropped:?}");
    guard.hang_currents.store(false, std::sync::atomic::Ordering::SeqCst);
    rt.maintain().await.expect("maintain");
    assert!(w.hot.is_available(&x).await.expect("available"), "the lapsed lease was given back");
    let report = rt.flush_all().await.expect("the next flush drains it");
    assert_eq!(report.objects, 1, "{report:?}");
    assert_eq!(w.cold.watermark(&x).await.expect("watermark").through, 1);
}

/// An owed object (see above) that the next flush drains only in part (its second commit fails)
/// stays owed: the flush after that drains the rest. It was forgotten after its first commit,
/// and the next flush answered `Ok` with its other change left in hot storage.
#[tokio::test]
async fn an_owed_object_drained_in_part_stays_owed() {
    let w = World::new();
    let (cold, rt) =
        w.flaky_cold_runtime(RuntimeSettings { flush_batch_records: 1, drain_released: false, ..settings() });
    let (a, b) = (oid("a"), oid("b"));
    for o in [&a, &b, &a, &b] {
        incr(&rt, o).await.expect("incr");
    }
    let clock = w.clock.clone();
    *cold.before_append.lock() = Some(Box::pin(async move { clock.advance(TTL * 2) }));
    rt.flush_all().await.expect_err("one object's lease ran out before its commit");
    // The object none of whose changes landed, given back undrained (owed); the other had its
    // first change committed before the leases ran out: `flush` drains its second.
    let mut untouched = Vec::new();
    for o in [&a, &b] {
        if w.cold.watermark(o).await.expect("watermark").through == 0 {
            untouched.push(o.clone());
        } else {
            rt.flush(o).await.expect("the other object drains");
        }
    }
    assert_eq!(untouched.len(), 1, "one object none of whose changes landed");
    let o = &untouched[0];
    assert!(w.hot.is_available(o).await.expect("available"), "given back undrained (owed)");
    // The next flush commits its first change, then cold goes down.
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    *cold.each_append.lock() = Some(Arc::new({
        let (down, cold) = (down.clone(), cold.clone());
        move || {
            if !down.swap(true, std::sync::atomic::Ordering::SeqCst) {
                cold.down.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }));
    let ticking = tick(&w);
    rt.flush_all().await.expect_err("its second commit fails");
    ticking.abort();
    *cold.each_append.lock() = None;
    cold.down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(w.cold.watermark(o).await.expect("watermark").through, 1, "drained in part");
    let report = rt.flush_all().await.expect("the next flush drains the rest");
    assert_eq!(report.objects, 1, "{report:?}");
    assert_eq!(w.cold.watermark(o).await.expect("watermark").through, 2);
}

/// A flush whose cold commit's outcome stays unknown after its attempts fails with a retryable
/// `Unavailable` (the next flush settles it: exactly once), as `flush_all` and `shutdown` do:
/// `AmbiguousOutcome` (not retryable) made a host that retries retryable errors stop flushing.
#[tokio::test]
async fn a_flush_of_unknown_outcome_is_retryable() {
    for call in ["flush", "flush_all", "shutdown"] {
        let w = World::new();
        let (cold, rt) = w.flaky_cold_runtime(settings());
        let o = oid("o");
        incr(&rt, &o).await.expect("incr");
        cold.ambiguous_appends.store(100, std::sync::atomic::Ordering::SeqCst);
        let ticking = tick(&w);
        let e = match call {
            "flush" => rt.flush(&o).await.map(|_| ()),
            "flush_all" => rt.flush_all().await.map(|_| ()),
            _ => rt.shutdown().await.map(|_| ()),
        }
        .expect_err("the commit's outcome stays unknown");
        ticking.abort();
        assert_eq!(e.kind(), &ErrorKind::Unavailable, "{call}: {e}");
        assert!(e.is_retryable(), "{call}: {e}");
        cold.ambiguous_appends.store(0, std::sync::atomic::Ordering::SeqCst);
        if call != "shutdown" {
            rt.flush(&o).await.expect("the next flush settles it");
            assert_eq!(w.cold.watermark(&o).await.expect("watermark").through, 1, "{call}");
        }
    }
}

/// `flush_all` holds only the objects it has changes to drain: a call on a clean object does
/// not wait for a slow cold commit of others.
#[tokio::test]
async fn flush_all_does_not_hold_clean_objects() {
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(settings());
    let (dirty, clean) = (oid("dirty"), oid("clean"));
    incr(&rt, &dirty).await.expect("dirty");
    incr(&rt, &clean).await.expect("clean");
    rt.flush(&clean).await.expect("flush clean");
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    *cold.before_append.lock() = Some(Box::pin(async move { g.notified().await }));
    let flushing = tokio::spawn({
        let rt = rt.clone();
        async move { rt.flush_all().await }
    });
    // flush_all is in its cold commit (it took the hook), holding what it holds.
    until("flush_all is committing", || async { cold.before_append.lock().is_none() }).await;
    let read = tokio::time::timeout(Duration::from_secs(10), get(&rt, &clean, "n")).await;
    assert_eq!(read.expect("not held by the flush").expect("get"), Some(Bytes::from("1")));
    gate.notify_one();
    let report = flushing.await.expect("task").expect("flush_all");
    assert_eq!((report.objects, report.records), (1, 1));
}

/// An object taken over while `flush_all` commits it is left out (its changes are in cold; the
/// new holder finds them there); the other objects of the same commit are truncated and the
/// flush succeeds.
#[tokio::test]
async fn flush_all_leaves_out_an_object_taken_over_during_its_commit() {
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(settings());
    let (x, y) = (oid("x"), oid("y"));
    incr(&rt, &x).await.expect("x");
    incr(&rt, &y).await.expect("y");
    let (hot, clock, taken) = (w.hot.clone(), w.clock.clone(), x.clone());
    *cold.before_append.lock() = Some(Box::pin(async move {
        let l = hot.current(&taken).await.expect("current").expect("held");
        hot.release(&l).await.expect("release");
        clock.advance(Duration::from_millis(1));
        hot.acquire(&taken, &NodeId::new("b").expect("node"), TTL).await.expect("b takes x over");
    }));
    let report = rt.flush_all().await.expect("the other objects are drained all the same");
    assert_eq!(report.records, 2, "both were committed");
    assert_eq!(report.objects, 1, "only y was truncated");
    assert!(!w.hot.object_info(&y).await.expect("info").expect("y").has_pending_changes());
    assert!(w.hot.object_info(&x).await.expect("info").expect("x").has_pending_changes(), "x is b's to drain");
    let l = w.hot.current(&x).await.expect("current").expect("b's lease");
    w.hot.release(&l).await.expect("release");
    let b = w.runtime("b", settings());
    assert_eq!(incr(&b, &x).await.expect("b goes on from cold and hot"), 2);
    b.flush(&x).await.expect("b drains x");
    let seqs: Vec<u64> = w.cold.read_changes(&x, 0, AsOf::Latest).await.expect("cold").iter().map(|c| c.seq).collect();
    assert_eq!(seqs, [1, 2], "each change once");
}

/// Before the next append of `cold`, node "b" takes `x` over (the lease given up, the clock moved
/// on) and drains its change log into the world's cold store under its own token.
fn taken_over_and_drained_before_the_append(w: &World, cold: &FlakyCold, x: &ObjectId) {
    let (hot, sink, clock, taken) = (w.hot.clone(), w.cold.clone(), w.clock.clone(), x.clone());
    *cold.before_append.lock() = Some(Box::pin(async move {
        let l = hot.current(&taken).await.expect("current").expect("held");
        hot.release(&l).await.expect("release");
        clock.advance(Duration::from_millis(1));
        let b = hot.acquire(&taken, &NodeId::new("b").expect("node"), TTL).await.expect("b takes x over");
        let records = hot.read_changes(&taken, 0, 10).await.expect("x's log");
        sink.append(ColdBatch::single(taken.clone(), b.token, records)).await.expect("b's commit");
    }));
}

/// An object whose changes cold refuses as `Fenced` during `flush_all` (another node took it
/// over and drained it under its higher token while the flush was committing) is left to its new
/// holder, as the runtime docs say: the flush drains the others and answers `Ok`. (It failed with
/// that `Fenced`, which a caller reads as final, though nothing of this runtime's was left.)
#[tokio::test]
async fn flush_all_leaves_out_an_object_cold_refuses_as_fenced() {
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(settings());
    let (x, y) = (oid("x"), oid("y"));
    incr(&rt, &x).await.expect("x");
    incr(&rt, &y).await.expect("y");
    taken_over_and_drained_before_the_append(&w, &cold, &x);
    let report = rt.flush_all().await.expect("x is b's: the flush drains the others and succeeds");
    assert_eq!(report.objects, 1, "y: {report:?}");
    assert!(!w.hot.object_info(&y).await.expect("info").expect("y").has_pending_changes(), "y is drained");
    assert_eq!(w.cold.watermark(&y).await.expect("wm y").through, 1);
    let seqs: Vec<u64> = w.cold.read_changes(&x, 0, AsOf::Latest).await.expect("cold").iter().map(|c| c.seq).collect();
    assert_eq!(seqs, [1], "x's change once, under b's commit");
}

/// The same when the object cold refuses is the only one in the flush's commit.
#[tokio::test]
async fn flush_all_leaves_out_a_lone_object_cold_refuses_as_fenced() {
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(settings());
    let x = oid("x");
    incr(&rt, &x).await.expect("x");
    taken_over_and_drained_before_the_append(&w, &cold, &x);
    let report = rt.flush_all().await.expect("x is b's: nothing of this runtime's is left");
    assert_eq!((report.objects, report.records), (0, 0), "{report:?}");
    let seqs: Vec<u64> = w.cold.read_changes(&x, 0, AsOf::Latest).await.expect("cold").iter().map(|c| c.seq).collect();
    assert_eq!(seqs, [1]);
}

/// A cold commit whose reply was lost, which the retry then finds in cold (every record
/// skipped), counts in the flush report and the metrics: it was this call's. (The retry's
/// answer, nothing written, was all that was counted.)
#[tokio::test]
async fn a_commit_whose_reply_was_lost_counts_once() {
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(settings());
    let (x, y) = (oid("x"), oid("y"));
    for _ in 0..3 {
        incr(&rt, &x).await.expect("x");
    }
    cold.lost_replies.store(1, std::sync::atomic::Ordering::SeqCst);
    // The retry waits on the test's clock.
    let ticking = tick(&w);
    let report = rt.flush(&x).await.expect("flush");
    assert_eq!(cold.lost_replies.load(std::sync::atomic::Ordering::SeqCst), 0, "the reply was lost");
    assert_eq!((report.commits, report.records), (1, 3), "{report:?}");
    let m = rt.metrics();
    assert_eq!((m.flushes, m.records_flushed), (1, 3));
    incr(&rt, &y).await.expect("y");
    cold.lost_replies.store(1, std::sync::atomic::Ordering::SeqCst);
    let report = rt.flush_all().await.expect("flush_all");
    assert_eq!(cold.lost_replies.load(std::sync::atomic::Ordering::SeqCst), 0, "the reply was lost");
    assert_eq!((report.commits, report.records), (1, 1), "{report:?}");
    let m = rt.metrics();
    assert_eq!((m.flushes, m.records_flushed), (2, 4));
    ticking.abort();
    let seqs: Vec<u64> = w.cold.read_changes(&x, 0, AsOf::Latest).await.expect("cold").iter().map(|c| c.seq).collect();
    assert_eq!(seqs, [1, 2, 3], "each change once");
}

/// A cold commit counts in the metrics as it lands, also when the drain fails after it (here:
/// the object was taken over during the commit, so its truncation is fenced): the next drain
/// finds those records in cold and commits nothing, so they would be counted nowhere.
#[tokio::test]
async fn a_commit_counts_in_the_metrics_even_if_its_drain_fails_after_it() {
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(settings());
    let x = oid("x");
    incr(&rt, &x).await.expect("x");
    let (hot, clock, taken) = (w.hot.clone(), w.clock.clone(), x.clone());
    *cold.before_append.lock() = Some(Box::pin(async move {
        let l = hot.current(&taken).await.expect("current").expect("held");
        hot.release(&l).await.expect("release");
        clock.advance(Duration::from_millis(1));
        hot.acquire(&taken, &NodeId::new("b").expect("node"), TTL).await.expect("b takes x over");
    }));
    let e = rt.flush(&x).await.expect_err("the truncation is fenced");
    assert!(matches!(e.kind(), ErrorKind::Fenced { .. } | ErrorKind::LeaseLost { .. }), "{e}");
    let m = rt.metrics();
    assert_eq!((m.flushes, m.records_flushed), (1, 1), "the commit that landed is counted");
    let seqs: Vec<u64> = w.cold.read_changes(&x, 0, AsOf::Latest).await.expect("cold").iter().map(|c| c.seq).collect();
    assert_eq!(seqs, [1], "it did land");
}

/// A flush of several rounds renews the leases of the objects it holds (`maintain` skips them
/// while they are held): a flush that outlasts the TTL does not lose them.
#[tokio::test]
async fn a_long_flush_renews_the_leases_it_holds() {
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(RuntimeSettings { flush_batch_records: 1, ..settings() });
    let o = oid("o");
    for _ in 0..4 {
        incr(&rt, &o).await.expect("incr");
    }
    let before = w.hot.current(&o).await.expect("current").expect("held");
    // Each of the four one-record commits takes 40% of the TTL.
    let clock = w.clock.clone();
    *cold.each_append.lock() = Some(Arc::new(move || clock.advance(TTL * 2 / 5)));
    let report = rt.flush_all().await.expect("flush");
    assert_eq!((report.commits, report.records, report.objects), (4, 4, 1));
    let after = w.hot.current(&o).await.expect("current").expect("still held");
    assert_eq!(after.token, before.token, "the same lease, renewed");
    assert!(!w.hot.object_info(&o).await.expect("info").expect("o").has_pending_changes());
    assert_eq!(incr(&rt, &o).await.expect("still active"), 5);
    assert_eq!(rt.metrics().activations, 1);
}

/// One `flush_all` commit that outlasts the TTL (a large batch to a slow store, here two TTLs)
/// keeps the held leases renewed: another node cannot take the objects over meanwhile, and the
/// flush ends with the objects still this runtime's. The leases were renewed only between
/// commits: they ran out under the commit and the flush failed after its changes had landed.
#[tokio::test]
async fn a_flush_all_commit_that_outlasts_the_lease_keeps_the_held_leases() {
    use std::sync::atomic::Ordering;
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(settings());
    let (x, y) = (oid("x"), oid("y"));
    incr(&rt, &x).await.expect("x");
    incr(&rt, &y).await.expect("y");
    let (slow, hot, taken) = (clock_moves_on(&w.clock, 20), w.hot.clone(), x.clone());
    let b_refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused = b_refused.clone();
    *cold.before_append.lock() = Some(Box::pin(async move {
        slow.await;
        let b = hot.acquire(&taken, &NodeId::new("b").expect("valid"), TTL).await;
        refused.store(b.is_err_and(|e| matches!(e.kind(), ErrorKind::LeaseHeld { .. })), Ordering::SeqCst);
    }));
    let report = rt.flush_all().await.expect("flush_all");
    assert_eq!((report.commits, report.records, report.objects), (1, 2, 2));
    assert!(b_refused.load(Ordering::SeqCst), "node b took x over during the commit");
    for o in [&x, &y] {
        let l = w.hot.current(o).await.expect("current").expect("still held");
        assert_eq!(l.holder.as_str(), "a", "{o}");
    }
    assert_eq!(incr(&rt, &x).await.expect("x is still active here"), 2);
    assert_eq!(rt.metrics().activations, 2, "x and y, once each");
}

/// Runtime "a" on a [`FlakyGuard`] and a [`FlakyCold`] over `w`'s stores, and object "o" it
/// incremented once (so it holds its lease).
async fn written_under_a_flaky_guard_and_cold(w: &World) -> (Arc<FlakyGuard>, Arc<FlakyCold>, ObjectRuntime, ObjectId) {
    let guard = Arc::new(FlakyGuard::new(w));
    let cold = Arc::new(FlakyCold::new(w.cold.clone()));
    let rt = w.runtime_with("a", guard.clone(), cold.clone(), settings());
    let o = oid("o");
    incr(&rt, &o).await.expect("incr");
    (guard, cold, rt, o)
}

/// A held object whose lease runs out while a commit is in flight (the guard unreachable for two
/// TTLs), but whose changes that commit lands and truncates, does not fail the flush: it
/// answered `Err` saying the object's changes waited in hot storage while they were in cold.
#[tokio::test]
async fn a_lease_lost_during_a_commit_that_drained_the_object_does_not_fail_the_flush() {
    use std::sync::atomic::Ordering;
    let w = World::new();
    let (guard, cold, rt, o) = written_under_a_flaky_guard_and_cold(&w).await;
    let (slow, g) = (clock_moves_on(&w.clock, 20), guard.clone());
    *cold.before_append.lock() = Some(Box::pin(async move {
        g.fail_refreshes.store(u32::MAX, Ordering::SeqCst);
        slow.await;
        g.fail_refreshes.store(0, Ordering::SeqCst);
    }));
    let report = rt.flush_all().await.expect("the object was drained");
    assert_eq!((report.commits, report.records, report.objects), (1, 1, 1));
    assert!(guard.refreshes.load(Ordering::SeqCst) > 0, "renewals were tried during the commit");
    assert!(!w.hot.object_info(&o).await.expect("info").expect("o").has_pending_changes());
    assert_eq!(w.cold.watermark(&o).await.expect("wm").through, 1);
}

/// A held lease with little left when a long commit begins (its refreshes failed transiently
/// just before) is tried again before it runs out, not a tenth of a TTL later: the flush keeps
/// the object instead of losing its lease mid-commit.
#[tokio::test]
async fn a_held_lease_with_little_left_is_renewed_early_during_a_commit() {
    use std::sync::atomic::Ordering;
    let w = World::new();
    let (guard, cold, rt, o) = written_under_a_flaky_guard_and_cold(&w).await;
    // 5% of the TTL left, and the flush's first two refreshes (collecting, then the first round)
    // fail transiently: the commit begins with the lease about to run out.
    w.clock.advance(TTL * 95 / 100);
    guard.fail_refreshes.store(2, Ordering::SeqCst);
    let clock = w.clock.clone();
    *cold.before_append.lock() = Some(Box::pin(async move {
        for _ in 0..100 {
            clock.advance(TTL / 100);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }));
    let report = rt.flush_all().await.expect("flush_all");
    assert_eq!((report.records, report.objects), (1, 1));
    let l = w.hot.current(&o).await.expect("current").expect("still held");
    assert_eq!(l.holder.as_str(), "a");
    assert_eq!(incr(&rt, &o).await.expect("still active"), 2);
    assert_eq!(rt.metrics().activations, 1, "the object kept its activation");
}

/// Collecting many released objects to drain (an acquire and a cold watermark read each, here
/// 50 ms of the clock per read: 256 of them outlast the TTL) keeps the leases already held
/// renewed: the first drain round found them run out, and `flush_all` failed every time.
#[tokio::test]
async fn collecting_many_released_objects_keeps_held_leases_renewed() {
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(settings());
    let held = oid("held");
    incr(&rt, &held).await.expect("a warm object with a pending change");
    released_objects_slow_to_check(&w, &cold, 256).await;
    let report = rt.flush_all().await.expect("every object drained");
    assert_eq!(report.objects, 257, "{report:?}");
    assert!(!w.hot.object_info(&held).await.expect("info").expect("held").has_pending_changes());
    assert_eq!(incr(&rt, &held).await.expect("still active"), 2);
}

/// `n` objects with a pending change and no holder (a node that is gone released them), and a
/// cold sink each of whose watermark reads takes 50 ms of the clock.
async fn released_objects_slow_to_check(w: &World, cold: &FlakyCold, n: usize) {
    let other = NodeId::new("gone").expect("node");
    for i in 0..n {
        let o = oid(&format!("released-{i:03}"));
        let l = w.hot.acquire(&o, &other, TTL).await.expect("acquire");
        w.hot.put(&o, l.token, "Object", "n", Bytes::from("1")).await.expect("put");
        w.hot.release(&l).await.expect("release");
    }
    let clock = w.clock.clone();
    *cold.each_watermark.lock() = Some(Arc::new(move || clock.advance(Duration::from_millis(50))));
}

/// A held lease that is short when `flush_all` collects it (nothing renewed it for most of a
/// TTL) is renewed at once: the pacing of the renewals during collection reached it only after a
/// sixth of a TTL, by when it had run out.
#[tokio::test]
async fn a_short_held_lease_is_renewed_when_flush_all_collects_it() {
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(settings());
    let held = oid("held");
    incr(&rt, &held).await.expect("a warm object with a pending change");
    w.clock.advance(TTL - Duration::from_millis(500));
    released_objects_slow_to_check(&w, &cold, 20).await;
    let report = rt.flush_all().await.expect("every object drained");
    assert_eq!(report.objects, 21, "{report:?}");
    assert!(!w.hot.object_info(&held).await.expect("info").expect("held").has_pending_changes());
}

/// After `set_ring` gives an object to another node, the next `maintain` hands it over (gives
/// its lease back) while no call uses it: the new owner need not wait for `keep_warm`.
#[tokio::test]
async fn maintain_hands_over_objects_the_ring_gives_another_node() {
    let w = World::new();
    let a = ring_runtime(&w, "a", "a");
    hands_over_to_b(&w, &a, "a owns o").await;
}

/// `a` serves object `o` (`why` it may), then its ring names node "b" alone: the next
/// `maintain` gives `o` back, and a runtime on "b" takes it at once.
async fn hands_over_to_b(w: &World, a: &ObjectRuntime, why: &str) {
    let o = oid("o");
    assert_eq!(incr(a, &o).await.expect(why), 1);
    a.set_ring(ring_of("b"));
    a.maintain().await.expect("maintain");
    let b = ring_runtime(w, "b", "b");
    assert_eq!(incr(&b, &o).await.expect("b takes o at once"), 2);
}

/// The same from a ring without members (membership not known yet, or a flap that emptied it):
/// the objects this node activated meanwhile go to their owner once members arrive. Before,
/// none was handed over (an empty ring named no owner, so none counted as "was here").
#[tokio::test]
async fn maintain_hands_over_objects_activated_under_an_empty_ring() {
    let w = World::new();
    let a = ring_runtime_with(&w, "a", HashRing::new(16).expect("ring"));
    hands_over_to_b(&w, &a, "no owner known: served here").await;
}

/// `maintain` is refused once shutdown has begun (it would renew leases shutdown gives back),
/// and shutdown waits for a round already running instead of skipping the object it holds.
#[tokio::test]
async fn maintain_and_shutdown_do_not_race() {
    let w = World::new();
    let (cold, rt) =
        w.flaky_cold_runtime(RuntimeSettings { evict_idle_after: Some(Duration::from_secs(5)), ..settings() });
    let (idle, o) = (oid("idle"), oid("o"));
    incr(&rt, &idle).await.expect("idle");
    w.clock.advance(Duration::from_secs(6));
    incr(&rt, &o).await.expect("o");
    // maintain evicts `idle`; its drain pauses in the cold commit.
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    *cold.before_append.lock() = Some(Box::pin(async move { g.notified().await }));
    let maintaining = tokio::spawn({
        let rt = rt.clone();
        async move { rt.maintain().await }
    });
    // Shutdown begins only once maintain's drain is paused in the cold commit (it took the hook).
    for _ in 0..5_000 {
        if cold.before_append.lock().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(cold.before_append.lock().is_none(), "maintain never reached the cold commit");
    let shutting = tokio::spawn({
        let rt = rt.clone();
        async move { rt.shutdown().await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!shutting.is_finished(), "shutdown waits for the maintenance round");
    // Meanwhile a new round is refused at once (shutdown has begun), not run beside it.
    let e = tokio::time::timeout(Duration::from_secs(5), rt.maintain())
        .await
        .expect("refused at once")
        .expect_err("shutdown has begun");
    assert_eq!(e.kind(), &ErrorKind::Shutdown, "{e}");
    gate.notify_one();
    maintaining.await.expect("task").expect("maintain");
    let ticking = tick(&w);
    let report = shutting.await.expect("task").expect("shutdown");
    ticking.abort();
    assert_eq!(report.busy, 0);
    assert!(w.hot.is_available(&o).await.expect("available"), "o given back");
    assert!(!w.hot.object_info(&o).await.expect("info").expect("o").has_pending_changes(), "o drained");
    let e = rt.maintain().await.expect_err("after shutdown");
    assert_eq!(e.kind(), &ErrorKind::Shutdown);
}

/// `evict_idle` judges each object's idleness when it comes to evict it: an object used while
/// the ones before it were evicted stays.
#[tokio::test]
async fn evict_idle_keeps_an_object_used_meanwhile() {
    let w = World::new();
    let (cold, rt) =
        w.flaky_cold_runtime(RuntimeSettings { evict_idle_after: Some(Duration::from_secs(5)), ..settings() });
    let (first, second) = (oid("a-first"), oid("b-second"));
    incr(&rt, &first).await.expect("first");
    incr(&rt, &second).await.expect("second");
    w.clock.advance(Duration::from_secs(6));
    // While `first` is drained for its eviction, `second` is used.
    let (rt2, used) = (rt.clone(), second.clone());
    *cold.before_append.lock() = Some(Box::pin(async move {
        incr(&rt2, &used).await.expect("a call meanwhile");
    }));
    assert_eq!(rt.evict_idle().await.expect("evict_idle"), 1, "only the idle one");
    assert_eq!(w.hot.object_info(&second).await.expect("info").expect("second").keys, 1, "still in hot storage");
    assert_eq!(rt.metrics().evictions, 1);
}

/// `complete_restores` installs the whole cold state of every lazily restored object in hot
/// storage, skips an object with a call in progress instead of waiting for it, and is refused
/// after shutdown.
#[tokio::test]
async fn complete_restores_installs_lazy_state_and_skips_busy_objects() {
    let w = World::new();
    let a = w.runtime("a", settings());
    let (o, busy) = (oid("o"), oid("busy"));
    populate(&a, &o, 20).await;
    populate(&a, &busy, 5).await;
    a.evict(&o).await.expect("evict o");
    a.evict(&busy).await.expect("evict busy");
    let lazy = RuntimeSettings { restore: RestoreMode::Lazy, ..settings() };
    let b = w.runtime("b", lazy);
    assert_eq!(get(&b, &o, "key/0003").await.expect("lazy read").as_deref(), Some(&b"value-3"[..]));
    assert_eq!(get(&b, &busy, "key/0001").await.expect("lazy read").as_deref(), Some(&b"value-1"[..]));
    assert_eq!(w.hot.list(&o, KeyRange::all(), None).await.expect("hot").len(), 0, "still lazy");
    // A call on `busy` is in progress while the restores complete.
    let (entered, release) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
    let handler = tokio::spawn({
        let (b, busy, entered, release) = (b.clone(), busy.clone(), entered.clone(), release.clone());
        async move {
            b.invoke(&busy, async |_t: &mut ObjectTxn<'_>| {
                entered.notify_one();
                release.notified().await;
                Ok::<_, Error>(())
            })
            .await
        }
    });
    entered.notified().await;
    let done = tokio::time::timeout(Duration::from_secs(10), b.complete_restores()).await;
    done.expect("does not wait for the busy object").expect("complete_restores");
    assert_eq!(w.hot.list(&o, KeyRange::all(), None).await.expect("hot").len(), 20, "o installed whole");
    assert_eq!(w.hot.list(&busy, KeyRange::all(), None).await.expect("hot").len(), 0, "busy skipped");
    release.notify_one();
    handler.await.expect("task").expect("handler");
    b.complete_restores().await.expect("again");
    assert_eq!(w.hot.list(&busy, KeyRange::all(), None).await.expect("hot").len(), 5);
    b.shutdown().await.expect("shutdown");
    assert_eq!(b.complete_restores().await.expect_err("after shutdown").kind(), &ErrorKind::Shutdown);
}

/// A prefetch counts as use: `maintain` does not evict the object as idle right after it.
#[tokio::test]
async fn a_prefetch_keeps_an_idle_object_from_eviction() {
    let w = World::new();
    let rt = w.runtime("a", RuntimeSettings { evict_idle_after: Some(Duration::from_secs(5)), ..settings() });
    let o = oid("o");
    incr(&rt, &o).await.expect("incr");
    w.clock.advance(Duration::from_secs(6));
    rt.prefetch(&o, &["n".to_string()], &[]).await.expect("prefetch");
    rt.maintain().await.expect("maintain");
    assert_eq!(rt.metrics().evictions, 0, "just prefetched");
    assert_eq!(w.hot.object_info(&o).await.expect("info").expect("o").keys, 1);
}

/// An acquire whose ambiguous reply turned out not to have landed is settled: when the other
/// runtime under the same node id later takes the object again, this runtime neither adopts that
/// lease nor gives it back in `maintain`.
#[tokio::test]
async fn a_settled_ambiguous_acquire_never_adopts_a_later_lease_of_the_same_node_id() {
    let w = World::new();
    let first = w.runtime("a", RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    let o = oid("o");
    let held = w.hot.acquire(&o, &NodeId::new("a").expect("node"), TTL).await.expect("held by the first");
    w.clock.advance(Duration::from_secs(1));
    let guard = Arc::new(FlakyGuard::new(&w));
    let second = w.runtime_with("a", guard.clone(), Arc::new(w.cold.clone()), settings());
    guard.refused_ambiguous_acquires.store(1, std::sync::atomic::Ordering::SeqCst);
    let e = incr(&second, &o).await.expect_err("held by the first runtime");
    assert!(matches!(e.kind(), ErrorKind::LeaseHeld { .. }), "{e}");
    // The first runtime's lease ends; it takes the object again later.
    w.hot.release(&held).await.expect("release");
    w.clock.advance(Duration::from_secs(5));
    let again = w.hot.acquire(&o, &NodeId::new("a").expect("node"), TTL).await.expect("the first again");
    let e = incr(&second, &o).await.expect_err("not adopted");
    assert!(matches!(e.kind(), ErrorKind::LeaseHeld { .. }), "{e}");
    second.maintain().await.expect("maintain");
    assert_eq!(w.hot.current(&o).await.expect("current"), Some(again), "not given back by the second runtime");
    drop(first);
}

/// A runtime whose ring gives an object to another node from the start (a gateway outside the
/// ring) keeps it warm through `maintain`: only a ring change hands objects over.
#[tokio::test]
async fn maintain_keeps_objects_a_ring_set_at_build_gives_elsewhere() {
    let w = World::new();
    let gateway = ring_runtime(&w, "gw", "b");
    let o = oid("o");
    incr(&gateway, &o).await.expect("first");
    gateway.maintain().await.expect("maintain");
    incr(&gateway, &o).await.expect("second");
    assert_eq!(gateway.metrics().activations, 1, "kept warm");
}

/// A commit whose write has an unknown outcome gives the lease back: the next call writes under
/// a newer token, so the first write, landing late (a request still queued at a remote primary),
/// is fenced instead of overwriting newer state (a lost update).
#[tokio::test]
async fn a_write_of_unknown_outcome_landing_late_is_fenced() {
    let w = World::new();
    let hot = Arc::new(FaultyHot::new(w.hot.clone()));
    let rt = w.runtime_with_hot("a", hot.clone(), settings());
    let o = oid("o");
    assert_eq!(incr(&rt, &o).await.expect("first"), 1);
    hot.hold_next_write.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = incr(&rt, &o).await.expect_err("the write's outcome is unknown");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
    two_more_then_the_held_write_is_fenced(&w, &hot, &rt, &o).await;
}

/// After a first increment and a write held back: two more increments, then the held write,
/// landing late, is fenced and the state is the third increment's.
async fn two_more_then_the_held_write_is_fenced(w: &World, hot: &FaultyHot, rt: &ObjectRuntime, o: &ObjectId) {
    assert_eq!(incr(rt, o).await.expect("again"), 2);
    assert_eq!(incr(rt, o).await.expect("and again"), 3);
    let (object, token, batch) = hot.held.lock().pop().expect("the held write");
    let late = w.hot.write(&object, token, batch).await.expect_err("landing late");
    assert!(late.is_fenced(), "{late}");
    assert_eq!(get(rt, o, "n").await.expect("get"), Some(Bytes::from("3")), "no lost update");
}

/// A call cancelled while its write is in flight (a caller's timeout) leaves a write of unknown
/// outcome: the next call writes under a newer token, so that write, landing late, is fenced.
/// Before, the lease stayed in the slot, the next calls wrote under the same token, and the
/// late write overwrote them (a lost update).
#[tokio::test]
async fn a_write_of_a_cancelled_call_landing_late_is_fenced() {
    let w = World::new();
    let hot = Arc::new(FaultyHot::new(w.hot.clone()));
    let rt = w.runtime_with_hot("a", hot.clone(), settings());
    let o = oid("o");
    assert_eq!(incr(&rt, &o).await.expect("first"), 1);
    hot.hang_next_write.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(tokio::time::timeout(Duration::from_millis(20), incr(&rt, &o)).await.is_err(), "gave up");
    two_more_then_the_held_write_is_fenced(&w, &hot, &rt, &o).await;
}

/// An acquire granted after the call that sent it gave up (a blocking task or a queued request
/// runs on), and after the runtime's clock moved on: the next call still adopts the lease.
#[allow(clippy::disallowed_methods)] // waits for the late grant in real time
#[tokio::test]
async fn an_acquire_granted_after_its_call_gave_up_is_adopted() {
    let w = World::new();
    let (guard, rt) = w.flaky_guard_runtime(settings());
    let o = oid("o");
    guard.late_acquires.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(tokio::time::timeout(Duration::from_millis(20), incr(&rt, &o)).await.is_err(), "gave up");
    w.clock.advance(Duration::from_secs(1));
    until("the late acquire is granted", || async { w.hot.current(&o).await.expect("current").is_some() }).await;
    guard.late_acquires.store(false, std::sync::atomic::Ordering::SeqCst);
    let held = w.hot.current(&o).await.expect("current").expect("granted late");
    assert_eq!(held.holder.as_str(), "a");
    assert_eq!(incr(&rt, &o).await.expect("adopted"), 1);
    assert_eq!(w.hot.current(&o).await.expect("current").expect("held").token, held.token);
}

/// Whether `rt` has begun shutting down: a flush of an object it never saw is then refused
/// with `Shutdown` (and otherwise does nothing).
async fn shutting_down(rt: &ObjectRuntime) -> bool {
    matches!(rt.flush(&oid("shutdown-probe")).await, Err(e) if e.kind() == &ErrorKind::Shutdown)
}

/// Waits (real time, bounded) until `cond` holds.
#[allow(clippy::disallowed_methods)]
async fn until<F: std::future::Future<Output = bool>>(what: &str, cond: impl Fn() -> F) {
    for _ in 0..2000 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting: {what}");
}

/// Runtime "a" on a [`FlakyGuard`] whose acquires land only when the test lets them through
/// (`late_gate`), after a call on `o` gave up on its acquire (still in flight).
async fn cancelled_gated_acquire(w: &World) -> (Arc<FlakyGuard>, Arc<ObjectRuntime>, ObjectId) {
    use std::sync::atomic::Ordering::SeqCst;
    let guard = Arc::new(FlakyGuard::new(w));
    let rt = Arc::new(w.runtime_with("a", guard.clone(), Arc::new(w.cold.clone()), settings()));
    let o = oid("o");
    guard.late_acquires.store(true, SeqCst);
    guard.gate_late.store(true, SeqCst);
    assert!(tokio::time::timeout(Duration::from_millis(20), incr(&rt, &o)).await.is_err(), "gave up");
    (guard, rt, o)
}

/// After [`cancelled_gated_acquire`]: the next call settles the first acquire (not granted) and
/// sends its own, which waits too; the first lands, the second is refused naming this node, and
/// the call adopts the late lease (its first increment). Returns that lease.
async fn adopt_the_late_acquire(w: &World, guard: &FlakyGuard, rt: &Arc<ObjectRuntime>, o: &ObjectId) -> Lease {
    use std::sync::atomic::Ordering::SeqCst;
    let (rt2, o2) = (rt.clone(), o.clone());
    let next = tokio::spawn(async move { incr(&rt2, &o2).await });
    until("both acquires in flight", || async { guard.late_waiting.load(SeqCst) == 2 }).await;
    guard.late_gate.add_permits(1);
    until("the first acquire granted", || async { w.hot.current(o).await.expect("current").is_some() }).await;
    let held = w.hot.current(o).await.expect("current").expect("held");
    guard.late_gate.add_permits(1);
    assert_eq!(next.await.expect("task").expect("the late lease adopted"), 1);
    held
}

/// An acquire a cancelled call left in flight that lands only after the next call settled it
/// as not granted (and sent its own acquire): that call's acquire is refused naming this very
/// node, and it adopts the late lease instead of failing until the lease expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_landing_after_it_was_settled_as_not_granted_is_adopted() {
    use std::sync::atomic::Ordering::SeqCst;
    let w = World::new();
    let (guard, rt, o) = cancelled_gated_acquire(&w).await;
    let held = adopt_the_late_acquire(&w, &guard, &rt, &o).await;
    assert_eq!(held.holder.as_str(), "a");
    guard.late_acquires.store(false, SeqCst);
    assert_eq!(incr(&rt, &o).await.expect("warm"), 2);
    assert_eq!(w.hot.current(&o).await.expect("current").expect("held").token, held.token);
}

/// Once the late acquire's lease is adopted, that acquire is settled: after the runtime gives the
/// lease back, a lease another runtime under the same node id takes (within the first acquire's
/// TTL) is not released by `maintain` as an orphan of it. The settled acquire stayed recorded
/// and `maintain` released the other runtime's lease while its handler ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_late_acquire_is_forgotten() {
    use std::sync::atomic::Ordering::SeqCst;
    let w = World::new();
    let (guard, rt, o) = cancelled_gated_acquire(&w).await;
    adopt_the_late_acquire(&w, &guard, &rt, &o).await;
    guard.late_acquires.store(false, SeqCst);
    rt.evict(&o).await.expect("the lease goes back");
    assert!(w.hot.current(&o).await.expect("current").is_none(), "given back");
    let theirs = w.hot.acquire(&o, &NodeId::new("a").expect("node"), TTL).await.expect("the other runtime");
    rt.maintain().await.expect("maintain");
    assert_eq!(w.hot.current(&o).await.expect("current"), Some(theirs), "not released as an orphan");
}

/// The same race through `maintain`: it finds the cancelled call's acquire not granted yet; the
/// acquire lands afterwards, and the next call adopts its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_landing_after_maintain_checked_it_is_adopted() {
    use std::sync::atomic::Ordering::SeqCst;
    let w = World::new();
    let (guard, rt, o) = cancelled_gated_acquire(&w).await;
    until("the acquire in flight", || async { guard.late_waiting.load(SeqCst) == 1 }).await;
    rt.maintain().await.expect("maintain");
    assert!(w.hot.current(&o).await.expect("current").is_none(), "not granted yet when maintain checked");
    guard.late_gate.add_permits(1);
    until("granted late", || async { w.hot.current(&o).await.expect("current").is_some() }).await;
    guard.late_acquires.store(false, SeqCst);
    let held = w.hot.current(&o).await.expect("current").expect("granted late");
    assert_eq!(incr(&rt, &o).await.expect("adopted"), 1);
    assert_eq!(w.hot.current(&o).await.expect("current").expect("held").token, held.token);
}

/// The record of a cancelled call's acquire holds for a TTL after it was sent: a lease this node
/// id is granted later than that (another runtime under the same node id) is neither adopted
/// nor given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_of_the_same_node_id_granted_a_ttl_after_a_cancelled_acquire_is_not_adopted() {
    use std::sync::atomic::Ordering::SeqCst;
    let w = World::new();
    let (guard, rt, o) = cancelled_gated_acquire(&w).await;
    guard.late_acquires.store(false, SeqCst);
    // The cancelled acquire never lands; another runtime under node id "a" takes the object
    // more than a TTL later.
    w.clock.advance(TTL + Duration::from_secs(1));
    let theirs = w.hot.acquire(&o, &NodeId::new("a").expect("node"), TTL).await.expect("the other runtime");
    let e = incr(&rt, &o).await.expect_err("not adopted");
    assert!(matches!(e.kind(), ErrorKind::LeaseHeld { .. }), "{e}");
    rt.maintain().await.expect("maintain");
    assert_eq!(w.hot.current(&o).await.expect("current"), Some(theirs), "not given back either");
}

/// A second `set_ring` (a periodic membership sync) does not forget an object the first moved
/// away and no `maintain` has handed over yet.
#[tokio::test]
async fn a_repeated_set_ring_keeps_pending_hand_overs() {
    let w = World::new();
    let a = ring_runtime(&w, "a", "a");
    let o = oid("o");
    incr(&a, &o).await.expect("a owns o");
    a.set_ring(ring_of("b"));
    a.set_ring(ring_of("b"));
    a.maintain().await.expect("maintain");
    let b = ring_runtime(&w, "b", "b");
    assert_eq!(incr(&b, &o).await.expect("b takes o at once"), 2);
}

/// A call waiting for an object's slot when shutdown's flush ran (here a prefetch behind a long
/// handler, both entered before shutdown) leaves no lease behind: nothing would release it any
/// more, and other nodes would wait out its TTL. (It used to take a lease after the flush and
/// give it back when it ended; it is now refused with `Shutdown` before taking one.)
#[allow(clippy::disallowed_methods)] // real-time pauses while tasks reach their waits
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_ending_after_shutdowns_flush_gives_its_lease_back() {
    let w = World::new();
    let rt = Arc::new(w.runtime("a", settings()));
    let o = oid("o");
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
    let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
    let (rt1, o1) = (rt.clone(), o.clone());
    let long = tokio::spawn(async move {
        rt1.invoke(&o1, async move |t: &mut ObjectTxn<'_>| {
            let _ = entered_tx.send(());
            let _ = gate_rx.await;
            t.put("k", "v")?;
            Ok::<_, Error>(())
        })
        .await
    });
    entered_rx.await.expect("the handler runs");
    let (rt2, o2) = (rt.clone(), o.clone());
    let prefetch = tokio::spawn(async move { rt2.prefetch(&o2, &[], &[]).await });
    // Let the prefetch enter (counted in flight: it started before shutdown, or it would be
    // refused at once and never wait) and queue on the slot.
    until("the long call and the prefetch are in flight", || async { rt.metrics().in_flight == 2 }).await;
    // (From there it only takes the slot's lock, and waits.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rt3 = rt.clone();
    let shutdown = tokio::spawn(async move { rt3.shutdown().await });
    // Shutdown waits one TTL (9 s) for the calls; the clock never passes the long call's lease
    // before its renewal has run (however late a loaded machine schedules it).
    while !shutdown.is_finished() {
        testkit::advance_keeping_lease(&w.hot, &w.clock, &o, Duration::from_millis(100)).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    shutdown.await.expect("task").expect("shutdown");
    gate_tx.send(()).expect("open the gate");
    long.await.expect("task").expect("the long call");
    let e = prefetch.await.expect("task").expect_err("the prefetch waited past shutdown's flush");
    assert_eq!(e.kind(), &ErrorKind::Shutdown, "{e}");
    assert!(w.hot.current(&o).await.expect("current").is_none(), "no lease left behind");
}

/// A flush_all still running after shutdown's flush, whose later round renewed its lease after
/// shutdown began, gives that lease back when it ends: nothing would release it any more.
#[allow(clippy::disallowed_methods)] // real-time pauses while the flush blocks a worker
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_all_ending_after_shutdowns_flush_gives_its_leases_back() {
    let w = World::new();
    let (cold, rt) = w.flaky_cold_runtime(RuntimeSettings { flush_batch_records: 1, ..settings() });
    let rt = Arc::new(rt);
    let o = oid("o");
    for _ in 0..3 {
        incr(&rt, &o).await.expect("write");
    }
    // Each append waits for the test's go (blocking the flush's worker thread).
    let (go, gate) = std::sync::mpsc::channel::<()>();
    let gate = parking_lot::Mutex::new(gate);
    *cold.each_append.lock() = Some(Arc::new(move || {
        let _ = gate.lock().recv_timeout(Duration::from_secs(30));
    }));
    let rt1 = rt.clone();
    let flush = tokio::spawn(async move { rt1.flush_all().await });
    go.send(()).expect("round 1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rt2 = rt.clone();
    let shutdown = tokio::spawn(async move { rt2.shutdown().await });
    // (Begun, and a moment more for its wait to start, before the clock moves: on a loaded
    // machine the spawned shutdown may start late.)
    until("shutdown has begun", || shutting_down(&rt)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Half a TTL on, round 2 renews the lease (until 1.5 TTL from now-ish), then shutdown's
    // wait of one TTL runs out and it flushes while the flush still holds the object.
    w.clock.advance(TTL / 2);
    let before = w.hot.current(&o).await.expect("current").expect("held").expires_at;
    go.send(()).expect("round 2");
    let renewed = std::sync::Mutex::new(before);
    until("round 2 renews the lease", || async {
        let now = w.hot.current(&o).await.expect("current").map(|l| l.expires_at);
        now.is_some_and(|e| {
            e > before && {
                *renewed.lock().expect("renewed") = e;
                true
            }
        })
    })
    .await;
    let renewed = *renewed.lock().expect("renewed");
    // Shutdown's wait ends a TTL after it began, before the renewed lease does: the clock is
    // moved no closer than a second to that expiry (a late look at `is_finished` would have
    // stepped it past, and the lease would read as run out).
    let mut spins = 0u32;
    while !shutdown.is_finished() {
        if w.clock.now().plus(Duration::from_millis(1100)) < renewed {
            w.clock.advance(Duration::from_millis(100));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        spins += 1;
        assert!(spins < 60_000, "shutdown did not end");
    }
    shutdown.await.expect("task").expect("shutdown");
    let held = w.hot.current(&o).await.expect("current");
    assert!(held.is_some(), "the flush still holds a renewed lease while it runs");
    go.send(()).expect("round 3");
    flush.await.expect("task").expect("flush_all");
    assert!(w.hot.current(&o).await.expect("current").is_none(), "given back when the flush ended");
}

/// One object whose cold append is refused for good (here: its hot log starts past what this
/// cold store holds, so its batch would skip records) does not keep `flush_all` from draining
/// the others committed with it: they are drained, it is left out, and its error is returned.
/// (The whole multi-object commit failed, every round, and nothing was drained.)
#[tokio::test]
async fn an_object_cold_refuses_does_not_block_flush_all_for_the_others() {
    let w = World::new();
    let r1 = w.runtime("r1", RuntimeSettings { keep_warm: Duration::ZERO, ..settings() });
    let (a, b) = (oid("a"), oid("b"));
    for _ in 0..5 {
        incr(&r1, &b).await.expect("write b");
    }
    r1.flush(&b).await.expect("flush b");
    let fresh = MemoryColdStore::with_clock(Arc::new(w.clock.clone()));
    let r2 = ObjectRuntime::builder(NodeId::new("r2").expect("node"))
        .with_hot_store(Arc::new(w.hot.clone()))
        .with_guard(Arc::new(w.hot.clone()))
        .with_cold_sink(Arc::new(fresh.clone()))
        .with_clock(Arc::new(w.clock.clone()))
        .with_settings(settings())
        .build()
        .expect("runtime");
    assert_eq!(incr(&r2, &b).await.expect("b"), 6);
    assert_eq!(incr(&r2, &a).await.expect("a"), 1);
    let e = r2.flush_all().await.expect_err("b is refused");
    // Cold storage does not hold what the hot store truncated: damage, not bad input.
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert_eq!(fresh.watermark(&a).await.expect("watermark").through, 1, "a was drained");
    assert_eq!(fresh.watermark(&b).await.expect("watermark").through, 0);
    assert_eq!(r2.metrics().records_flushed, 1, "a's record counted once");
    assert_eq!(w.hot.object_info(&a).await.expect("info").expect("a").truncated_through, 1, "and truncated");
}

/// A lease given back to fence a write of unknown outcome, whose release keeps failing (so it
/// is still current), is never adopted as the landing of an acquire a cancelled call left
/// unsure: the next call waits it out and writes under a newer token, and the held write,
/// landing late, is fenced. (It was adopted, being "granted to this node since" that acquire,
/// and the late write overwrote the newer state.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_given_back_for_fencing_is_never_adopted() {
    use std::sync::atomic::Ordering::SeqCst;
    let w = World::new();
    let (hot, guard, rt) = w.faulty_runtime();
    let rt = Arc::new(rt);
    let o = oid("o");
    // An acquire left in flight by a cancelled call (it never lands: its gate stays shut).
    guard.late_acquires.store(true, SeqCst);
    guard.gate_late.store(true, SeqCst);
    assert!(tokio::time::timeout(Duration::from_millis(20), incr(&rt, &o)).await.is_err(), "gave up");
    guard.late_acquires.store(false, SeqCst);
    assert_eq!(incr(&rt, &o).await.expect("first"), 1);
    let first = w.hot.current(&o).await.expect("current").expect("held");
    hot.hold_next_write.store(true, SeqCst);
    guard.fail_releases.store(2, SeqCst);
    let e = incr(&rt, &o).await.expect_err("unknown outcome");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
    // The next call cannot release the first lease either: it is refused by it (this node's
    // own lease, not adopted) until it runs out.
    let e = incr(&rt, &o).await.expect_err("the given-back lease is still current");
    assert!(matches!(e.kind(), ErrorKind::LeaseHeld { .. }), "{e}");
    w.clock.advance(TTL);
    assert_eq!(incr(&rt, &o).await.expect("under a newer lease"), 2);
    assert!(w.hot.current(&o).await.expect("current").expect("held").token > first.token);
    let (object, token, batch) = hot.held.lock().pop().expect("the held write");
    let late = w.hot.write(&object, token, batch).await.expect_err("landing late");
    assert!(late.is_fenced(), "{late}");
    assert_eq!(get(&rt, &o, "n").await.expect("get"), Some(Bytes::from("2")), "no lost update");
}

/// After a write of unknown outcome, a failed release of the lease is tried again by the next
/// call instead of locking this node out until the lease expires.
#[tokio::test]
async fn a_failed_release_after_an_unknown_write_is_retried() {
    let w = World::new();
    let (hot, guard, rt) = w.faulty_runtime();
    let o = oid("o");
    assert_eq!(incr(&rt, &o).await.expect("first"), 1);
    let first = w.hot.current(&o).await.expect("current").expect("held");
    hot.hold_next_write.store(true, std::sync::atomic::Ordering::SeqCst);
    guard.fail_releases.store(1, std::sync::atomic::Ordering::SeqCst);
    let e = incr(&rt, &o).await.expect_err("unknown outcome");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
    assert_eq!(incr(&rt, &o).await.expect("the release is retried, a new lease taken"), 2);
    assert!(w.hot.current(&o).await.expect("current").expect("held").token > first.token);
}

/// A tracing subscriber that reads a runtime's metrics on every event (as a metrics exporter
/// may), counting its reads.
struct MetricsOnEvents {
    rt: Arc<std::sync::OnceLock<ObjectRuntime>>,
    reads: Arc<std::sync::atomic::AtomicU64>,
}

impl tracing::Subscriber for MetricsOnEvents {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {
        if let Some(rt) = self.rt.get() {
            std::hint::black_box(rt.metrics());
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A subscriber reading the metrics on events does not deadlock an activation: its event
/// ("dotdo activation") was emitted under the metrics' lock, which the read then waited for
/// on the same thread, for ever.
#[test]
fn a_subscriber_reading_the_metrics_on_events_does_not_deadlock_an_activation() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let slot = Arc::new(std::sync::OnceLock::new());
        let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let _subscribed = tracing::subscriber::set_default(MetricsOnEvents { rt: slot.clone(), reads: reads.clone() });
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
        let activations = runtime.block_on(async {
            let w = World::new();
            let rt = w.runtime("a", settings());
            slot.set(rt.clone()).ok();
            incr(&rt, &oid("o")).await.expect("incr");
            rt.metrics().activations
        });
        tx.send((activations, reads.load(std::sync::atomic::Ordering::SeqCst))).ok();
    });
    let (activations, reads) = rx.recv_timeout(Duration::from_secs(60)).expect("the activation ended");
    assert_eq!(activations, 1);
    assert!(reads > 0, "the subscriber read the metrics on the activation's event");
}

/// A handler's error carrying what it listed (or the runtime's error).
enum Listed {
    Runtime(#[allow(dead_code)] Error),
    Lists(Vec<(String, Bytes)>, Vec<(String, Bytes)>, Vec<(String, Bytes)>, Vec<(String, Bytes)>),
}

impl From<Error> for Listed {
    fn from(e: Error) -> Self {
        Listed::Runtime(e)
    }
}

/// A handler's `list` merges its own buffered writes with the stored state: a pending delete
/// hides a stored key, pending puts inside the range (and only those) are listed, in key order,
/// once each; an inverted range lists nothing. On an eager and a lazily restored object alike,
/// and a handler that fails after listing commits nothing.
#[tokio::test]
async fn a_handlers_list_merges_its_own_writes_in_key_order() {
    let w = World::new();
    let a = w.runtime("a", settings());
    let o = oid("o");
    a.invoke(&o, async |t: &mut ObjectTxn<'_>| {
        for k in ["a", "b", "c", "x/1"] {
            t.put(k, format!("{k}-old"))?;
        }
        Ok::<_, Error>(())
    })
    .await
    .expect("seed");
    a.evict(&o).await.expect("evict");
    let lazy = w.lazy_runtime("b", Arc::new(w.cold.clone()));
    for (name, rt) in [("eager", &a), ("lazy", &lazy)] {
        let listed = rt
            .invoke(&o, async |t: &mut ObjectTxn<'_>| {
                t.put("b2", "new")?;
                t.delete("b")?;
                t.put("zz", "new")?;
                t.put("b", "new")?;
                t.delete("c")?;
                let between = t.list(KeyRange::between("a", "c")).await?;
                let prefix = t.list(KeyRange::prefix("x/")).await?;
                let inverted = t.list(KeyRange::between("c", "a")).await?;
                let all = t.list(KeyRange::all()).await?;
                Err::<(), _>(Listed::Lists(between, prefix, inverted, all))
            })
            .await;
        let Err(Listed::Lists(between, prefix, inverted, all)) = listed else {
            panic!("{name}: the handler's error carries what it listed")
        };
        let keys = |v: &Vec<(String, Bytes)>| {
            v.iter().map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v))).collect::<Vec<_>>()
        };
        assert_eq!(keys(&between), ["a=a-old", "b=new", "b2=new"], "{name}");
        assert_eq!(keys(&prefix), ["x/1=x/1-old"], "{name}");
        assert!(inverted.is_empty(), "{name}");
        assert_eq!(keys(&all), ["a=a-old", "b=new", "b2=new", "x/1=x/1-old", "zz=new"], "{name}");
        let state = all_state(rt, &o).await;
        let stored: Vec<&str> = state.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(stored, ["a", "b", "c", "x/1"], "{name}: the failed handler committed nothing");
        if name == "eager" {
            // Out of hot storage again, so that the next runtime's activation is lazy.
            a.evict(&o).await.expect("evict");
            a.shutdown().await.expect("shutdown");
        } else {
            let recovery = rt.metrics().recent_activations.front().map(|m| m.recovery);
            assert_eq!(recovery, Some(Recovery::Lazy), "{name}");
        }
    }
}
