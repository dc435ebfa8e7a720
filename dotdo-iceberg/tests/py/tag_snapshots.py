"""Name snapshots of a dotdo-iceberg table with PyIceberg: a tag and a branch.

usage: tag_snapshots.py <sqlite-catalog-file> <warehouse-url> <namespace.table> <tag-snapshot-id> <branch-snapshot-id>
"""
import sys

from pyiceberg.catalog.sql import SqlCatalog

db, warehouse, ident, tag_at, branch_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
catalog = SqlCatalog("dotdo", uri=f"sqlite:///{db}", warehouse=warehouse)
table = catalog.load_table(ident)
table.manage_snapshots().create_tag(tag_at, "release-1").create_branch(branch_at, "audit").commit()
print("ok")
