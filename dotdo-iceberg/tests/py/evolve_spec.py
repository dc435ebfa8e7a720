"""Evolve the partition spec of a dotdo-iceberg table with PyIceberg, as another engine would
(a metadata-only change): by default replace bucket[16](do_id) by bucket[32](do_id); with a
fourth argument, replace every partition field by `identity` (identity(do_id)) or `bucket:N`
(bucket[N](do_id)).

usage: evolve_spec.py <sqlite-catalog-file> <warehouse-url> <namespace.table> [identity|bucket:N]
"""
import sys

from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.transforms import BucketTransform, IdentityTransform

db, warehouse, ident = sys.argv[1], sys.argv[2], sys.argv[3]
to = sys.argv[4] if len(sys.argv) > 4 else "bucket:32"
catalog = SqlCatalog("dotdo", uri=f"sqlite:///{db}", warehouse=warehouse)
table = catalog.load_table(ident)
# Field names are unique across the table's specs (a removed field's name stays taken in v1).
n = len(table.specs())
with table.update_spec() as update:
    for field in table.spec().fields:
        update.remove_field(field.name)
    if to == "identity":
        update.add_field("do_id", IdentityTransform(), f"do_id_identity_{n}")
    else:
        buckets = int(to.split(":", 1)[1])
        update.add_field("do_id", BucketTransform(buckets), f"do_id_bucket{buckets}_{n}")
print(catalog.load_table(ident).spec())
