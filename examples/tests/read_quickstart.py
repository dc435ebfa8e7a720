"""Reads the Iceberg table the quickstart left behind with PyIceberg and checks it.

usage: read_quickstart.py <warehouse dir>
Prints "rows objects snapshots" and exits non-zero on any mismatch.
"""
import collections
import sys

from pyiceberg.catalog.sql import SqlCatalog

wh = sys.argv[1]
catalog = SqlCatalog("dotdo", uri=f"sqlite:///{wh}/catalog.db", warehouse=f"file://{wh}")
table = catalog.load_table("app.changes")
rows = table.scan().to_arrow().to_pylist()
by_object = collections.defaultdict(list)
for r in rows:
    assert r["op"] in ("put", "delete"), r
    by_object[r["do_id"]].append(r["seq"])
for obj, seqs in by_object.items():
    assert sorted(seqs) == list(range(1, len(seqs) + 1)), f"{obj}: sequence numbers not 1..n exactly once"
# cart:2 got item/kiwi = 5 in the second flush.
kiwi = [r for r in rows if r["do_id"] == "cart:2" and r["key"] == "item/kiwi"]
assert len(kiwi) == 1 and kiwi[0]["value"] == b"5", kiwi
snapshots = sorted(table.snapshots(), key=lambda s: s.sequence_number)  # metadata order is not chronological
assert len(snapshots) >= 2
# Time travel: the first snapshot has no kiwi yet.
first = table.scan(snapshot_id=snapshots[0].snapshot_id).to_arrow().to_pylist()
assert not [r for r in first if r["key"] == "item/kiwi"], "kiwi visible in the first snapshot"
print(len(rows), len(by_object), len(snapshots))
