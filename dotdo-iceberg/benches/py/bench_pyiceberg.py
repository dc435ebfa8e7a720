"""PyIceberg 0.12 peer of dotdo-iceberg's cold benchmarks, on the same data (the same generator
as benches/cold.rs) appended to a local SQL-catalog table.

usage: bench_pyiceberg.py <workdir> <rows> <objects> <small_commits>
Prints one JSON line: {"append_s": .., "rows": .., "commit10_p50_ms": .., "commit10_p99_ms": ..,
"read_one_p50_ms": .., "append_bytes": ..}. Like benches/cold.rs: 5 untimed 10-row commits first,
then <small_commits> timed ones, quantiles by the same nearest-rank rule as dotdo's harness.
"""
import json
import os
import sys
import time

import pyarrow as pa
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.expressions import EqualTo
from pyiceberg.schema import Schema
from pyiceberg.types import BinaryType, LongType, NestedField, StringType, TimestamptzType

workdir, n_rows, n_objects, n_small = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
BASE_US = 1_767_225_600_000_000
VALUE = bytes(i % 251 for i in range(64))

SCHEMA = Schema(
    NestedField(1, "do_id", StringType(), required=True),
    NestedField(2, "type", StringType(), required=True),
    NestedField(3, "key", StringType(), required=True),
    NestedField(4, "value", BinaryType(), required=True),
    NestedField(5, "timestamp", TimestamptzType(), required=True),
    NestedField(6, "op", StringType(), required=True),
    NestedField(7, "seq", LongType(), required=True),
    NestedField(8, "token", LongType(), required=True),
)
ARROW = pa.schema([
    pa.field("do_id", pa.string(), nullable=False),
    pa.field("type", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("value", pa.large_binary(), nullable=False),
    pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("op", pa.string(), nullable=False),
    pa.field("seq", pa.int64(), nullable=False),
    pa.field("token", pa.int64(), nullable=False),
])


def rows(start, n, n_objects):
    """Row i: object i % n_objects, its (i // n_objects + 1)-th change, key k<seq % 100>."""
    idx = range(start, start + n)
    do_id = [f"obj-{i % n_objects:05}" for i in idx]
    seq = [i // n_objects + 1 for i in idx]
    return pa.table({
        "do_id": do_id,
        "type": ["Event"] * n,
        "key": [f"k{s % 100}" for s in seq],
        "value": [VALUE] * n,
        "timestamp": [BASE_US + i for i in idx],
        "op": ["put"] * n,
        "seq": seq,
        "token": [1] * n,
    }, schema=ARROW)


os.makedirs(workdir, exist_ok=True)
catalog = SqlCatalog("bench", uri=f"sqlite:///{workdir}/catalog.db", warehouse=f"file://{workdir}")
catalog.create_namespace_if_not_exists("bench")

# The small commits first, on a quiet machine, as in benches/cold.rs.
def quantile(samples, q):
    """dotdo_core::testkit::bench::Samples::quantile: sorted[round((len - 1) * q)], halves
    rounded up as Rust's f64::round does (Python's round() rounds them to even)."""
    s = sorted(samples)
    return s[int((len(s) - 1) * q + 0.5)]


small = catalog.create_table("bench.small", SCHEMA)
lat = []
for c in range(5 + n_small):
    b = rows(c * 10, 10, 1)
    start = time.perf_counter()
    small.append(b)
    if c >= 5:
        lat.append(time.perf_counter() - start)

big = rows(0, n_rows, n_objects)
t = catalog.create_table("bench.big", SCHEMA, properties={"write.parquet.compression-codec": "zstd",
                                                          "write.parquet.compression-level": "1"})
start = time.perf_counter()
t.append(big)
append_s = time.perf_counter() - start

reads = []
for i in range(10):
    start = time.perf_counter()
    got = t.scan(row_filter=EqualTo("do_id", f"obj-{(i * 37) % n_objects:05}")).to_arrow()
    latest = {}
    for k, s in zip(got.column("key").to_pylist(), got.column("seq").to_pylist()):
        if s > latest.get(k, 0):
            latest[k] = s
    reads.append(time.perf_counter() - start)


print(json.dumps({
    "append_s": append_s,
    "rows": n_rows,
    "commit10_p50_ms": quantile(lat, 0.5) * 1e3,
    "commit10_p99_ms": quantile(lat, 0.99) * 1e3,
    "read_one_p50_ms": quantile(reads, 0.5) * 1e3,
    "append_bytes": sum(os.path.getsize(os.path.join(d, f))
                        for d, _, fs in os.walk(t.location().removeprefix("file://"))
                        for f in fs if f.endswith(".parquet")),
}))
