"""Create an empty format-version 1 table with dotdo's change-table schema and bucket[16](do_id)
partitioning, as another engine (or an older tool) would.

usage: create_v1_table.py <sqlite-catalog-file> <warehouse-url> <namespace.table>
"""
import sys

from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.transforms import BucketTransform
from pyiceberg.types import BinaryType, LongType, NestedField, StringType, TimestamptzType

db, warehouse, ident = sys.argv[1], sys.argv[2], sys.argv[3]
catalog = SqlCatalog("dotdo", uri=f"sqlite:///{db}", warehouse=warehouse)
catalog.create_namespace_if_not_exists(ident.split(".")[0])
schema = Schema(
    NestedField(1, "do_id", StringType(), required=True),
    NestedField(2, "type", StringType(), required=True),
    NestedField(3, "key", StringType(), required=True),
    NestedField(4, "value", BinaryType(), required=True),
    NestedField(5, "timestamp", TimestamptzType(), required=True),
    NestedField(6, "op", StringType(), required=True),
    NestedField(7, "seq", LongType(), required=True),
    NestedField(8, "token", LongType(), required=True),
)
spec = PartitionSpec(PartitionField(source_id=1, field_id=1000, transform=BucketTransform(16), name="do_id_bucket"))
table = catalog.create_table(ident, schema=schema, partition_spec=spec, properties={"format-version": "1"})
print(table.metadata.format_version, table.spec())
