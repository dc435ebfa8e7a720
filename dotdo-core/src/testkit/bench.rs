//! A tiny benchmark harness shared by every dotdo benchmark.
//!
//! Each benchmark measures dotdo's figure and the raw engine's (or a peer's) figure **in the same
//! run** and records one row `{name, unit, ours, baseline_name, baseline, ratio, baseline_kind}`
//! where `ratio = ours / baseline` in `unit` and `baseline_kind` is `"same_run"`. Where no peer
//! can run ([`record_goal`]: a restore, a pipeline's end-to-end lag), the baseline is a goal or
//! bound and `baseline_kind` says `"goal"`; beside a figure given for reference only (a
//! predecessor's, [`record_reference`]) it says `"reference"`. A same-run row whose baseline could
//! not be measured (a peer that is unavailable or skipped, or a row with none, given as 0) says
//! `"none"`, with a `null` baseline and ratio. Rows are printed and appended as JSON lines to the file
//! named by `DOTDO_BENCH_JSONL` (`scripts/bench` sets it and merges the lines into
//! `target/bench/results.json`).
//!
//! Latencies are sampled per operation on the [`SystemClock`]'s monotonic
//! time, so percentiles (p50, p99) are real per-call figures, not averages.

use std::io::Write;
use std::time::Duration;

use crate::time::{Clock, SystemClock};

/// Per-operation latency samples.
#[derive(Debug, Clone)]
pub struct Samples {
    sorted: Vec<Duration>,
    total: Duration,
    ops: u64,
}

impl Samples {
    /// The `q` quantile (0.0..=1.0) of the per-operation latency.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        self.sorted[i]
    }

    /// Median latency.
    pub fn p50(&self) -> Duration {
        self.quantile(0.50)
    }

    /// 95th percentile latency.
    pub fn p95(&self) -> Duration {
        self.quantile(0.95)
    }

    /// 99th percentile latency.
    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }

    /// Operations per second over the whole run (`ops_per_call` operations per sampled call).
    pub fn ops_per_sec(&self) -> f64 {
        if self.total.is_zero() {
            return 0.0;
        }
        self.ops as f64 / self.total.as_secs_f64()
    }
}

/// Run `f` `warmup` times unmeasured, then `iters` times measuring each call; each call counts as
/// `ops_per_call` operations for throughput.
pub fn sample(warmup: usize, iters: usize, ops_per_call: u64, mut f: impl FnMut()) -> Samples {
    let clock = SystemClock::new();
    for _ in 0..warmup {
        f();
    }
    let mut sorted = Vec::with_capacity(iters);
    let start = clock.monotonic();
    for _ in 0..iters {
        let t = clock.monotonic();
        f();
        sorted.push(clock.monotonic().saturating_sub(t));
    }
    let total = clock.monotonic().saturating_sub(start);
    sorted.sort_unstable();
    Samples { sorted, total, ops: ops_per_call * iters as u64 }
}

/// Measure two operations interleaved in chunks of `chunk` calls (ours then baseline, then
/// baseline then ours, ...), so that background load on the machine, and work either side
/// leaves behind, affect both figures alike. Returns `(ours, baseline)`.
pub fn sample_pair(
    warmup: usize,
    iters: usize,
    chunk: usize,
    mut ours: impl FnMut(),
    mut baseline: impl FnMut(),
) -> (Samples, Samples) {
    let clock = SystemClock::new();
    for _ in 0..warmup {
        ours();
        baseline();
    }
    let mut a = Vec::with_capacity(iters);
    let mut b = Vec::with_capacity(iters);
    let (mut ta, mut tb) = (Duration::ZERO, Duration::ZERO);
    let chunk = chunk.max(1);
    let mut ours_first = true;
    while a.len() < iters {
        let n = chunk.min(iters - a.len());
        let mut sides =
            [(&mut ours as &mut dyn FnMut(), &mut a, &mut ta), (&mut baseline as &mut dyn FnMut(), &mut b, &mut tb)];
        // Alternate which side goes first in each chunk: work one side leaves behind (a
        // checkpoint, frees) would otherwise always fall into the other side's window.
        if !ours_first {
            sides.reverse();
        }
        ours_first = !ours_first;
        for (f, out, total) in sides {
            let start = clock.monotonic();
            for _ in 0..n {
                let t = clock.monotonic();
                f();
                out.push(clock.monotonic().saturating_sub(t));
            }
            *total += clock.monotonic().saturating_sub(start);
        }
    }
    let finish = |mut v: Vec<Duration>, total| {
        v.sort_unstable();
        let ops = v.len() as u64;
        Samples { sorted: v, total, ops }
    };
    (finish(a, ta), finish(b, tb))
}

/// Values that differ on every call: `len` bytes with a running counter in the first 8.
///
/// Write benchmarks must use these, for dotdo and for the raw engine alike. SQLite skips the
/// page write when an update leaves a row's bytes unchanged, so an upsert that rewrites the same
/// value commits nothing and measures a no-op, not a write.
#[derive(Debug, Clone)]
pub struct Values {
    template: Vec<u8>,
    next: u64,
}

impl Values {
    /// Values of `len` bytes (at least 8).
    pub fn new(len: usize) -> Self {
        Values { template: vec![42u8; len.max(8)], next: 0 }
    }

    /// The next value, unlike every earlier one.
    pub fn next_value(&mut self) -> bytes::Bytes {
        self.next += 1;
        let mut v = self.template.clone();
        v[..8].copy_from_slice(&self.next.to_le_bytes());
        bytes::Bytes::from(v)
    }
}

/// Microseconds as `f64`.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Milliseconds as `f64`.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Record one result row whose baseline was measured in the same run: print it and append it
/// to `DOTDO_BENCH_JSONL` if set.
pub fn record(name: &str, unit: &str, ours: f64, baseline_name: &str, baseline: f64) {
    write_row(name, unit, ours, baseline_name, baseline, "same_run");
}

/// Record one result row whose baseline is a goal or bound (no peer measured in the run), marked
/// so in its output (`baseline_kind: "goal"`, and "goal" before the baseline when printed).
pub fn record_goal(name: &str, unit: &str, ours: f64, goal_name: &str, goal: f64) {
    write_row(name, unit, ours, goal_name, goal, "goal");
}

/// Record one result row beside a figure for reference only (neither measured in the run nor a
/// goal: a predecessor's published figure), marked `baseline_kind: "reference"`.
pub fn record_reference(name: &str, unit: &str, ours: f64, reference_name: &str, reference: f64) {
    write_row(name, unit, ours, reference_name, reference, "reference");
}

/// Whether the run skips the benchmarks' peers (`DOTDO_BENCH_NO_PEER` set and not empty, as
/// `scripts/bench` reads it).
pub fn no_peer() -> bool {
    std::env::var_os("DOTDO_BENCH_NO_PEER").is_some_and(|v| !v.is_empty())
}

fn write_row(name: &str, unit: &str, ours: f64, baseline_name: &str, baseline: f64, kind: &str) {
    // No baseline measured: not a same-run comparison (a reader filtering on "same_run" took 0
    // as the peer's figure).
    let (kind, baseline) = if kind == "same_run" && !(baseline.is_finite() && baseline != 0.0) {
        ("none", f64::NAN)
    } else {
        (kind, baseline)
    };
    let ratio = if baseline == 0.0 { f64::NAN } else { ours / baseline };
    let goal = match kind {
        "goal" => "goal ",
        "reference" => "ref ",
        _ => "",
    };
    println!("{name:<48} {unit:>8}  ours {ours:>14.3}  {goal}{baseline_name} {baseline:>14.3}  ratio {ratio:.3}");
    let row = format!(
        "{{\"name\":{},\"unit\":{},\"ours\":{},\"baseline_name\":{},\"baseline\":{},\"ratio\":{},\"baseline_kind\":{}}}",
        json_str(name),
        json_str(unit),
        json_num(ours),
        json_str(baseline_name),
        json_num(baseline),
        json_num(ratio),
        json_str(kind)
    );
    if let Ok(path) = std::env::var("DOTDO_BENCH_JSONL") {
        // A row that cannot be written fails the benchmark: `results.json` silently lacked it.
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
        writeln!(f, "{row}").unwrap_or_else(|e| panic!("cannot append to {path}: {e}"));
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_throughput() {
        let s = sample(0, 100, 10, || std::thread::sleep(Duration::from_micros(10)));
        assert!(s.p50() >= Duration::from_micros(10));
        assert!(s.p99() >= s.p50());
        assert!(s.ops_per_sec() > 0.0 && s.ops_per_sec() < 1_000_000.0);
        assert_eq!(json_str("a\"b\n"), "\"a\\\"b\\u000a\"");
        assert_eq!(json_num(f64::NAN), "null");
    }
}
