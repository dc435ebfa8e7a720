"""PyIceberg 0.12 peer of dotdo-iceberg's accelerator benchmark: point lookups on the same table
(written by dotdo, read through the same SQLite catalog) as filtered scans,
`row_filter = do_id == o AND key == k`, then the latest version of the key by seq.

usage: bench_accel_pyiceberg.py <sqlite-catalog-file> <warehouse-url> <namespace.table> <lookups.json>
lookups.json: [[do_id, key], ...]
Prints one JSON line: {"lookup_p50_ms": .., "lookup_mean_ms": .., "files_planned_mean": .., "seqs": [..]}
where seqs[i] is the latest seq found for lookup i (null if absent).
"""
import json
import statistics
import sys
import time

from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.expressions import And, EqualTo

db, warehouse, ident, lookups_file = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
lookups = json.load(open(lookups_file))
catalog = SqlCatalog("dotdo", uri=f"sqlite:///{db}", warehouse=warehouse)
table = catalog.load_table(ident)

lat, seqs, planned = [], [], []
for i, (o, k) in enumerate(lookups):
    start = time.perf_counter()
    scan = table.scan(row_filter=And(EqualTo("do_id", o), EqualTo("key", k)))
    got = scan.to_arrow()
    best = None
    for s in got.column("seq").to_pylist():
        if best is None or s > best:
            best = s
    lat.append(time.perf_counter() - start)
    seqs.append(best)
    # Outside the timed part, for every lookup (the figure is an average over all of them).
    planned.append(len(list(table.scan(row_filter=And(EqualTo("do_id", o), EqualTo("key", k))).plan_files())))

print(json.dumps({
    "lookup_p50_ms": statistics.median(lat) * 1e3,
    "lookup_mean_ms": statistics.mean(lat) * 1e3,
    "files_planned_mean": statistics.mean(planned) if planned else None,
    "seqs": seqs,
}))
