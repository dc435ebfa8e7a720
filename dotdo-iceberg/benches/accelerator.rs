//! IndexAccelerator point lookups (issue 5) on a table of 240 data files from 15 commits over
//! 1,500 objects, beside PyIceberg 0.12's filtered scan (`row_filter = do_id == o AND key == k`)
//! of the same table in the same run (benches/py/bench_accel_pyiceberg.py, run with
//! `DOTDO_PYTHON` or `<workspace>/.venv`).
//!
//! Commit `c` writes 20 keys of each object `o` with `o % 5 == c % 5` (one file per
//! `bucket(do_id)` partition, 16 per commit), so every file's `do_id` and `key` bounds span
//! nearly the whole id and key space: only bloom filters tell the files of a bucket apart. Each
//! object is in 3 commits whose key ranges overlap by 5 keys (overwrites), so a key lives in
//! one or two files.
//!
//! Reported: lookup p50 with warm caches (with and without the per-read catalog pointer check)
//! and on a fresh store (manifests, footers and bloom filters not cached), average files
//! opened, bytes read and files pruned per layer. PyIceberg runs twice (before and between two
//! rounds of ours); each side's better p50 is used.

use std::path::PathBuf;

use bytes::Bytes;
use dotdo_core::testkit::bench::{ms, record, sample, us};
use dotdo_core::{
    AsOf, ChangeRecord, ColdBatch, ColdSink, FencingToken, IndexAccelerator, ObjectChanges, ObjectId, Op, QueryStats,
    Timestamp,
};
use dotdo_iceberg::{IcebergColdStore, Settings};

const OBJECTS: u64 = 1_500;
const COMMITS: u64 = 15;
const KEYS_PER_COMMIT: u64 = 20;
const KEY_STRIDE: u64 = 15;
const LOOKUPS: usize = 200;
const PY_LOOKUPS: usize = 30;

fn object(o: u64) -> ObjectId {
    ObjectId::new(format!("obj-{o:05}")).expect("id")
}

fn key(k: u64) -> String {
    format!("k{k:03}")
}

/// Commit `c`: objects `o % 5 == c % 5`, each its `n = c / 5`-th batch of keys
/// `n * 15 .. n * 15 + 20` with seqs `n * 20 + 1 ..`.
fn commit(c: u64) -> ColdBatch {
    let n = c / 5;
    let value = Bytes::from((0..64u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    ColdBatch {
        objects: (0..OBJECTS)
            .filter(|o| o % 5 == c % 5)
            .map(|o| ObjectChanges {
                object: object(o),
                token: FencingToken::new(1),
                records: (0..KEYS_PER_COMMIT)
                    .map(|j| ChangeRecord {
                        object: object(o),
                        seq: n * KEYS_PER_COMMIT + j + 1,
                        key: key(n * KEY_STRIDE + j),
                        op: Op::Put,
                        value: value.clone(),
                        token: FencingToken::new(1),
                        timestamp: Timestamp::from_millis((c * 1000 + j) as i64),
                        type_name: "Event".into(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The latest seq of key index `k` of any object: written by the last batch covering it.
fn expected_seq(k: u64) -> u64 {
    let n = (0..COMMITS / 5).rev().find(|n| n * KEY_STRIDE <= k && k < n * KEY_STRIDE + KEYS_PER_COMMIT).expect("key");
    n * KEYS_PER_COMMIT + (k - n * KEY_STRIDE) + 1
}

/// Deterministic (object, key index) pairs.
fn lookups(n: usize) -> Vec<(u64, u64)> {
    let key_space = (COMMITS / 5 - 1) * KEY_STRIDE + KEYS_PER_COMMIT;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((x >> 33) % OBJECTS, (x >> 13) % key_space)
        })
        .collect()
}

fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DOTDO_PYTHON").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    venv.exists().then_some(venv)
}

struct Peer {
    p50_ms: f64,
    files_planned: f64,
}

fn pyiceberg(dir: &std::path::Path, warehouse: &str, pairs: &[(u64, u64)]) -> Option<Peer> {
    if dotdo_core::testkit::bench::no_peer() {
        return None;
    }
    let Some(py) = python() else {
        eprintln!("SKIP PyIceberg peer: DOTDO_PYTHON unset and no .venv (run scripts/pyenv)");
        return None;
    };
    let list: Vec<serde_json::Value> =
        pairs.iter().map(|&(o, k)| serde_json::json!([object(o).as_str(), key(k)])).collect();
    let lookups_file = dir.join("lookups.json");
    std::fs::write(&lookups_file, serde_json::Value::Array(list).to_string()).expect("write lookups");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/py/bench_accel_pyiceberg.py");
    // Bounded: a peer that hangs (on a lock of the catalog file, say) fails the bench, not hangs it.
    let out = dotdo_core::testkit::process::output_within(
        std::process::Command::new(py)
            .arg(script)
            .arg(dir.join("catalog.db"))
            .arg(warehouse)
            .arg("bench.accel")
            .arg(&lookups_file),
        std::time::Duration::from_secs(900),
        "bench_accel_pyiceberg.py",
    );
    if !out.status.success() {
        eprintln!("PyIceberg peer failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("peer json");
    let seqs: Vec<Option<u64>> = v["seqs"].as_array().expect("seqs").iter().map(|s| s.as_u64()).collect();
    let want: Vec<Option<u64>> = pairs.iter().map(|&(_, k)| Some(expected_seq(k))).collect();
    assert_eq!(seqs, want, "PyIceberg and the generator disagree");
    Some(Peer {
        p50_ms: v["lookup_p50_ms"].as_f64().unwrap_or(f64::NAN),
        files_planned: v["files_planned_mean"].as_f64().unwrap_or(f64::NAN),
    })
}

#[derive(Default)]
struct Totals {
    n: u64,
    files_total: u64,
    partition: u64,
    min_max: u64,
    bloom: u64,
    opened: u64,
    row_groups: u64,
    bytes: u64,
}

impl Totals {
    fn add(&mut self, s: &QueryStats) {
        self.n += 1;
        self.files_total += s.files_total;
        self.partition += s.pruned_by_partition;
        self.min_max += s.pruned_by_min_max;
        self.bloom += s.pruned_by_bloom;
        self.opened += s.files_opened;
        self.row_groups += s.row_groups_read;
        self.bytes += s.bytes_read;
    }

    fn avg(&self, v: u64) -> f64 {
        v as f64 / self.n.max(1) as f64
    }

    fn print(&self, label: &str) {
        eprintln!(
            "{label}: files {:.0}, pruned by partition {:.2} / min-max {:.2} / bloom {:.2}, opened {:.2}, row groups {:.2}, bytes read {:.0}",
            self.avg(self.files_total),
            self.avg(self.partition),
            self.avg(self.min_max),
            self.avg(self.bloom),
            self.avg(self.opened),
            self.avg(self.row_groups),
            self.avg(self.bytes)
        );
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || {
        rt.block_on(IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).table(["bench"], "accel").build())
            .expect("open")
    };
    let store = open();
    for c in 0..COMMITS {
        rt.block_on(store.append(commit(c))).expect("append");
    }
    let pairs = lookups(LOOKUPS);

    // A fresh store for each lookup (opened outside the timing): nothing cached, every lookup
    // reads its manifests, footers and filters. (One store for the whole pass had most of them
    // cached after a few dozen lookups, so its median was a warm figure.)
    let mut cold_totals = Totals::default();
    let mut cold_lat = Vec::with_capacity(pairs.len());
    for &(o, k) in &pairs {
        let cold_store = open();
        let clock = dotdo_core::SystemClock::new();
        let t = dotdo_core::Clock::monotonic(&clock);
        let l = rt.block_on(cold_store.lookup(&object(o), &key(k), AsOf::Latest)).expect("lookup");
        cold_lat.push(dotdo_core::Clock::monotonic(&clock).saturating_sub(t));
        assert_eq!(l.value.map(|v| v.seq), Some(expected_seq(k)), "lookup of obj {o} key {k}");
        cold_totals.add(&l.stats);
    }
    cold_lat.sort_unstable();
    let cold_p50 = cold_lat[cold_lat.len() / 2];

    // Warm caches; `pinned` reads with `refresh_reads: false` (no catalog round trip per read:
    // the store reads the table state it knows, as PyIceberg's loaded table does). Each side is
    // measured twice, around the second PyIceberg run; the better p50 of each is reported.
    let pinned = rt
        .block_on(
            IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
                .table(["bench"], "accel")
                .settings(Settings { refresh_reads: false, ..Settings::default() })
                .build(),
        )
        .expect("open");
    let mut warm_totals = Totals::default();
    let mut warm = Vec::new();
    let mut pinned_warm = Vec::new();
    let peer_before = pyiceberg(dir.path(), store.warehouse(), &pairs[..PY_LOOKUPS]);
    let mut peer_after = None;
    for round in 0..2 {
        if round == 1 {
            peer_after = pyiceberg(dir.path(), store.warehouse(), &pairs[..PY_LOOKUPS]);
        }
        let mut i = 0usize;
        warm.push(sample(LOOKUPS, 1000, 1, || {
            let (o, k) = pairs[i % pairs.len()];
            i += 1;
            let l = rt.block_on(store.lookup(&object(o), &key(k), AsOf::Latest)).expect("lookup");
            assert_eq!(l.value.as_ref().map(|v| v.seq), Some(expected_seq(k)));
            warm_totals.add(&l.stats);
        }));
        let mut i = 0usize;
        pinned_warm.push(sample(LOOKUPS, 1000, 1, || {
            let (o, k) = pairs[i % pairs.len()];
            i += 1;
            let l = rt.block_on(pinned.lookup(&object(o), &key(k), AsOf::Latest)).expect("lookup");
            assert_eq!(l.value.as_ref().map(|v| v.seq), Some(expected_seq(k)));
        }));
    }
    assert!(warm_totals.files_total / warm_totals.n >= 200, "the table must have at least 200 data files");
    cold_totals.print("fresh-store lookups");
    warm_totals.print("warm lookups");
    let best = |v: &[dotdo_core::testkit::bench::Samples]| {
        v.iter().min_by_key(|s| s.p50()).map(|s| (s.p50(), s.p99())).expect("samples")
    };
    let (warm_p50, warm_p99) = best(&warm);
    let (pinned_p50, _) = best(&pinned_warm);

    let peer = match (peer_before, peer_after) {
        (Some(a), Some(b)) => Some(Peer { p50_ms: a.p50_ms.min(b.p50_ms), files_planned: a.files_planned }),
        (a, b) => a.or(b),
    };
    let (label, py_ms, planned) = match &peer {
        Some(p) => ("pyiceberg-0.12 filtered scan", p.p50_ms, p.files_planned),
        None => ("pyiceberg-0.12 (unavailable)", 0.0, f64::NAN),
    };
    eprintln!("PyIceberg: lookup p50 {py_ms:.1} ms, files planned per scan {planned:.1}");
    record("accel point lookup p50, 240 files, warm caches", "ms", ms(warm_p50), label, py_ms);
    record("accel point lookup p50, 240 files, warm, refresh_reads off", "ms", ms(pinned_p50), label, py_ms);
    record("accel point lookup p50, 240 files, fresh store", "ms", ms(cold_p50), label, py_ms);
    record("accel point lookup p99, 240 files, warm caches", "us", us(warm_p99), "none", 0.0);
    record(
        // Not the same metric: PyIceberg's planned files (after its manifest and column-statistics
        // pruning, before reading any) against the files dotdo opens (after bloom filters too).
        "accel point lookup files opened (avg) vs PyIceberg files planned",
        "files",
        warm_totals.avg(warm_totals.opened),
        "pyiceberg files planned per scan (avg of every lookup), a different metric",
        planned,
    );
    record("accel point lookup bytes read, warm (avg)", "bytes", warm_totals.avg(warm_totals.bytes), "none", 0.0);
    record(
        "accel point lookup bytes read, fresh store (avg)",
        "bytes",
        cold_totals.avg(cold_totals.bytes),
        "none",
        0.0,
    );
    record("accel point lookup pruned by bloom (avg)", "files", warm_totals.avg(warm_totals.bloom), "none", 0.0);
}
