"""Evolve the partition spec of a dotdo-iceberg table with PyIceberg, as another engine would:
replace bucket[16](do_id) by bucket[32](do_id), or by identity(do_id) if the fourth argument is
"identity" (a metadata-only change).

usage: evolve_spec.py <sqlite-catalog-file> <warehouse-url> <namespace.table> [identity]
"""
import sys

from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.transforms import BucketTransform, IdentityTransform

db, warehouse, ident = sys.argv[1], sys.argv[2], sys.argv[3]
catalog = SqlCatalog("dotdo", uri=f"sqlite:///{db}", warehouse=warehouse)
table = catalog.load_table(ident)
with table.update_spec() as update:
    update.remove_field("do_id_bucket")
    if sys.argv[4:] == ["identity"]:
        update.add_field("do_id", IdentityTransform(), "do_id_identity")
    else:
        update.add_field("do_id", BucketTransform(32), "do_id_bucket32")
print(catalog.load_table(ident).spec())
