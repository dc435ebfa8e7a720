"""Rename two columns of a dotdo-iceberg table into each other with PyIceberg, as another engine
could: `seq` becomes `token` and `token` becomes `seq` (three schema changes through a spare
name). Names, types and order look like dotdo's again; the field ids are swapped.

usage: swap_columns.py <sqlite-catalog-file> <warehouse-url> <namespace.table>
"""
import sys

from pyiceberg.catalog.sql import SqlCatalog

db, warehouse, ident = sys.argv[1], sys.argv[2], sys.argv[3]
catalog = SqlCatalog("dotdo", uri=f"sqlite:///{db}", warehouse=warehouse)
for old, new in [("seq", "spare"), ("token", "seq"), ("spare", "token")]:
    table = catalog.load_table(ident)
    with table.update_schema() as update:
        update.rename_column(old, new)
print(catalog.load_table(ident).schema())
