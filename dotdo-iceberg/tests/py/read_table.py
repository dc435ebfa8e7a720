"""Read a dotdo-iceberg table with PyIceberg's SqlCatalog and print it as JSON.

usage: read_table.py <sqlite-catalog-file> <warehouse-url> <namespace.table> <as-of-snapshot-id>

Prints {"current": id, "snapshots": [ids], "latest": rows, "as_of": rows, "summary_keys": [...],
"operation": the current snapshot's operation, "data_files": live data files, "duckdb_latest":
the live data files' rows as DuckDB's Parquet reader reads them, ...}
where a row is [do_id, seq, key, op, value_hex, token, timestamp_us, type].
"""
import json
import sys

import duckdb
import pyarrow as pa
from pyiceberg.catalog.sql import SqlCatalog

db, warehouse, ident, as_of = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
catalog = SqlCatalog("dotdo", uri=f"sqlite:///{db}", warehouse=warehouse)
table = catalog.load_table(ident)


def rows(arrow_table: pa.Table):
    t = arrow_table.to_pydict()
    ts = arrow_table.column("timestamp").cast(pa.int64()).to_pylist()
    out = []
    for i in range(arrow_table.num_rows):
        out.append([
            t["do_id"][i], t["seq"][i], t["key"][i], t["op"][i], t["value"][i].hex(),
            t["token"][i], ts[i], t["type"][i],
        ])
    out.sort()
    return out


def duckdb_rows():
    paths = [t.file.file_path.removeprefix("file://") for t in table.scan().plan_files()]
    got = duckdb.sql(
        'SELECT do_id, seq, key, op, value, token, epoch_us("timestamp"), "type" FROM read_parquet($paths)',
        params={"paths": paths},
    ).fetchall()
    return sorted([d, s, k, o, bytes(v).hex(), t, ts, ty] for d, s, k, o, v, t, ts, ty in got)


current = table.current_snapshot()
print(json.dumps({
    "duckdb_latest": duckdb_rows(),
    "current": current.snapshot_id,
    "snapshots": [s.snapshot_id for s in table.snapshots()],
    "latest": rows(table.scan().to_arrow()),
    "as_of": rows(table.scan(snapshot_id=as_of).to_arrow()),
    "summary_keys": sorted(k for k in current.summary.additional_properties if k.startswith("dotdo.")),
    "partition_spec": str(table.spec()),
    "sort_order": str(table.sort_order()),
    "operation": current.summary.operation.value,
    "data_files": len(list(table.scan().plan_files())),
    # Per snapshot: (id, dotdo's commit time in us or None, timestamp-ms, the id PyIceberg's time
    # travel picks at dotdo's commit time in ms).
    "time_travel": [
        [s.snapshot_id, committed, s.timestamp_ms,
         (table.snapshot_as_of_timestamp(committed // 1000) or s).snapshot_id if committed is not None else None]
        for s in table.snapshots()
        for committed in [int(s.summary.additional_properties["dotdo.committed-at-us"])
                          if "dotdo.committed-at-us" in s.summary.additional_properties else None]
    ],
}))
