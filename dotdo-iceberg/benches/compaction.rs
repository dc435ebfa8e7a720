//! Compaction (issue 9) on a table of many small files: 120 commits, each touching 100 of 800
//! objects with 10 keys of 256-byte values (one small file per `bucket(do_id)` partition per
//! commit, ~1,900 files).
//!
//! Reported:
//! * compaction throughput in MB/s of input data files, beside a raw Parquet rewrite of the same
//!   files measured in the same run (decode every file, encode them into one ZSTD file; no sort,
//!   no manifests, no commit): the floor any compactor pays;
//! * point-lookup p50 (warm caches) and files opened per lookup, before vs after compaction.

use bytes::Bytes;
use dotdo_core::testkit::bench::{ms, record, sample};
use dotdo_core::{
    AsOf, ChangeRecord, Clock, ColdBatch, ColdSink, FencingToken, IndexAccelerator, ObjectChanges, ObjectId, Op,
    SystemClock, Timestamp,
};
use dotdo_iceberg::{CompactOptions, IcebergColdStore};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

const OBJECTS: u64 = 800;
const COMMITS: u64 = 120;
const PER_COMMIT: u64 = 100;
const KEYS: u64 = 10;
const LOOKUPS: usize = 200;

fn object(o: u64) -> ObjectId {
    ObjectId::new(format!("obj-{o:05}")).expect("id")
}

fn mix(x: u64) -> u64 {
    x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407)
}

/// Commit `c`: objects `(c * 37 + i * 8) % 800` for `i < 100`, each 10 keys.
fn commit(c: u64, seqs: &mut [u64]) -> ColdBatch {
    let mut objects: Vec<u64> = (0..PER_COMMIT).map(|i| (c * 37 + i * 8) % OBJECTS).collect();
    objects.sort_unstable();
    objects.dedup();
    ColdBatch {
        objects: objects
            .into_iter()
            .map(|o| ObjectChanges {
                object: object(o),
                token: FencingToken::new(1),
                records: (0..KEYS)
                    .map(|k| {
                        seqs[o as usize] += 1;
                        let mut x = mix(o * 1_000_003 + seqs[o as usize]);
                        let value: Vec<u8> = (0..256)
                            .map(|_| {
                                x = mix(x);
                                // Half random, half repetitive: compresses about like JSON.
                                if x.is_multiple_of(2) {
                                    (x >> 40) as u8
                                } else {
                                    b'a'
                                }
                            })
                            .collect();
                        ChangeRecord {
                            object: object(o),
                            seq: seqs[o as usize],
                            key: format!("k{k:02}"),
                            op: Op::Put,
                            value: Bytes::from(value),
                            token: FencingToken::new(1),
                            timestamp: Timestamp::from_millis((c * 1000 + k) as i64),
                            type_name: "Event".into(),
                        }
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Lookup p50 and average files opened over deterministic (object, key) pairs.
fn lookups(rt: &tokio::runtime::Runtime, store: &IcebergColdStore, latest: &[u64]) -> (std::time::Duration, f64, u64) {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let pairs: Vec<(u64, u64)> = (0..LOOKUPS)
        .map(|_| {
            x = mix(x);
            ((x >> 33) % OBJECTS, (x >> 13) % KEYS)
        })
        .filter(|(o, _)| latest[*o as usize] > 0)
        .collect();
    let (mut opened, mut n, mut files) = (0u64, 0u64, 0u64);
    let mut i = 0usize;
    let s = sample(pairs.len(), 1000, 1, || {
        let (o, k) = pairs[i % pairs.len()];
        i += 1;
        let l = rt.block_on(store.lookup(&object(o), &format!("k{k:02}"), AsOf::Latest)).expect("lookup");
        assert!(l.value.is_some(), "obj {o} key {k}");
        opened += l.stats.files_opened;
        files = l.stats.files_total;
        n += 1;
    });
    (s.p50(), opened as f64 / n.max(1) as f64, files)
}

/// Decode every input file and encode all rows into one ZSTD(1) Parquet file (in memory).
fn raw_rewrite(paths: &[std::path::PathBuf]) -> usize {
    let mut writer: Option<ArrowWriter<Vec<u8>>> = None;
    for p in paths {
        let bytes = Bytes::from(std::fs::read(p).expect("read input"));
        for b in ParquetRecordBatchReaderBuilder::try_new(bytes).expect("parquet").build().expect("reader") {
            let b = b.expect("batch");
            let w = writer.get_or_insert_with(|| {
                let props = WriterProperties::builder()
                    .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("level")))
                    .build();
                ArrowWriter::try_new(Vec::new(), b.schema(), Some(props)).expect("writer")
            });
            w.write(&b).expect("write");
        }
    }
    writer.map(|w| w.into_inner().expect("close").len()).unwrap_or(0)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = rt
        .block_on(IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).table(["bench"], "compact").build())
        .expect("open");
    let mut seqs = vec![0u64; OBJECTS as usize];
    for c in 0..COMMITS {
        rt.block_on(store.append(commit(c, &mut seqs))).expect("append");
    }
    let (before_p50, before_opened, before_files) = lookups(&rt, &store, &seqs);

    // The input files, for the raw baseline (same bytes the compaction reads).
    let inputs: Vec<std::path::PathBuf> = walk(&dir.path().join("bench").join("compact").join("data"));
    let input_bytes: u64 = inputs.iter().map(|p| std::fs::metadata(p).expect("meta").len()).sum();
    let clock = SystemClock::new();
    let t = clock.monotonic();
    let raw_out = raw_rewrite(&inputs);
    let raw_secs = clock.monotonic().saturating_sub(t).as_secs_f64();

    let t = clock.monotonic();
    let report = rt.block_on(store.compact(CompactOptions::default())).expect("compact");
    let secs = clock.monotonic().saturating_sub(t).as_secs_f64();
    assert_eq!(report.bytes_read, input_bytes, "the compaction rewrites every input file");
    assert_eq!(report.records_read, report.records_written);
    let (after_p50, after_opened, after_files) = lookups(&rt, &store, &seqs);

    let mb = input_bytes as f64 / 1e6;
    eprintln!(
        "compaction: {} files ({mb:.1} MB, {} records) -> {} files ({:.1} MB) in {secs:.2} s = {:.1} MB/s; raw parquet rewrite {raw_secs:.2} s ({:.1} MB out) = {:.1} MB/s",
        report.files_removed,
        report.records_read,
        report.files_added,
        report.bytes_written as f64 / 1e6,
        mb / secs,
        raw_out as f64 / 1e6,
        mb / raw_secs
    );
    eprintln!(
        "lookups: before {before_files} files, p50 {:.3} ms, opened {before_opened:.2}; after {after_files} files, p50 {:.3} ms, opened {after_opened:.2}",
        ms(before_p50),
        ms(after_p50)
    );
    record("compaction throughput, ~1.9k small files", "MB/s", mb / secs, "raw parquet decode+encode", mb / raw_secs);
    record(
        "lookup p50 after compaction (warm)",
        "ms",
        ms(after_p50),
        &format!("before compaction ({before_files} files)"),
        ms(before_p50),
    );
    record("lookup files opened after compaction (avg)", "files", after_opened, "before compaction", before_opened);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "parquet") {
            out.push(p);
        }
    }
    out
}
