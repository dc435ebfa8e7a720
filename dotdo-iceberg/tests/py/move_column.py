"""Reorder the columns of a dotdo-iceberg table with PyIceberg, as another engine would: move
`seq` after `token` (a metadata-only change; both are longs).

usage: move_column.py <sqlite-catalog-file> <warehouse-url> <namespace.table>
"""
import sys

from pyiceberg.catalog.sql import SqlCatalog

db, warehouse, ident = sys.argv[1], sys.argv[2], sys.argv[3]
catalog = SqlCatalog("dotdo", uri=f"sqlite:///{db}", warehouse=warehouse)
table = catalog.load_table(ident)
with table.update_schema() as update:
    update.move_after("seq", "token")
print(catalog.load_table(ident).schema())
