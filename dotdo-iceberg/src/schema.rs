//! The cold table's layout: schema, partitioning, sort order, and conversion between
//! [`ChangeRecord`]s and Arrow record batches.
//!
//! | column      | Iceberg type        | notes                                  |
//! |-------------|---------------------|----------------------------------------|
//! | `do_id`     | string              | the object id; partition source        |
//! | `type`      | string              | the object's type name                 |
//! | `key`       | string              | the state key                          |
//! | `value`     | binary              | the value (empty for a delete)         |
//! | `timestamp` | timestamptz (µs)    | when the change was made               |
//! | `op`        | string              | `put` / `delete`                       |
//! | `seq`       | long                | per-object sequence number             |
//! | `token`     | long                | fencing token the change was made under|
//!
//! Partitioned by `bucket(do_id, N)` (N = [`DEFAULT_BUCKETS`] unless configured): one object's
//! rows of a commit land in one file (a few in a commit larger than the target file size), and
//! a point read of an object skips every file of
//! the other N-1 buckets by partition value alone. Within a file rows are sorted by
//! `do_id, key, seq`, so the file's and each row group's `do_id` min/max bounds prune further.

use std::sync::Arc;

use arrow_array::builder::{Int64Builder, LargeBinaryBuilder, StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, SchemaRef as ArrowSchemaRef};
use bytes::Bytes;
use iceberg::spec::{
    Datum, NestedField, NullOrder, PrimitiveLiteral, PrimitiveType, Schema, SortDirection, SortField, SortOrder,
    Transform, Type, UnboundPartitionSpec,
};

use dotdo_core::{ChangeRecord, Error, FencingToken, ObjectId, Op, Result, Timestamp};

/// Default number of `do_id` buckets.
pub const DEFAULT_BUCKETS: u32 = 16;

/// Column names, in schema order.
pub(crate) const COLUMNS: [&str; 8] = ["do_id", "type", "key", "value", "timestamp", "op", "seq", "token"];

/// Columns that carry a Parquet bloom filter in each row group (when
/// [`Settings::bloom_filters`](crate::Settings::bloom_filters) is on): point lookups probe them
/// for the object id and the key.
pub const BLOOM_COLUMNS: [&str; 2] = ["do_id", "key"];

/// Columns written without compression, dictionary-encoded (sorted, repetitive strings and
/// small enums gain little from ZSTD).
pub const UNCOMPRESSED_COLUMNS: [&str; 5] = ["do_id", "type", "key", "op", "token"];

/// Integer columns written with `DELTA_BINARY_PACKED` encoding and no compression: rows are
/// sorted by `do_id, key, seq`, so deltas are small. Only `value` uses ZSTD, so a point lookup
/// creates one ZSTD context per row group instead of four (parquet 58 creates one per column
/// chunk, ~9 µs each).
pub const DELTA_COLUMNS: [&str; 2] = ["timestamp", "seq"];

/// The Iceberg schema of the cold table.
pub fn table_schema() -> Result<Schema> {
    let p = |t| Type::Primitive(t);
    Schema::builder()
        .with_schema_id(0)
        .with_fields(vec![
            NestedField::required(1, "do_id", p(PrimitiveType::String)).into(),
            NestedField::required(2, "type", p(PrimitiveType::String)).into(),
            NestedField::required(3, "key", p(PrimitiveType::String)).into(),
            NestedField::required(4, "value", p(PrimitiveType::Binary)).into(),
            NestedField::required(5, "timestamp", p(PrimitiveType::Timestamptz)).into(),
            NestedField::required(6, "op", p(PrimitiveType::String)).into(),
            NestedField::required(7, "seq", p(PrimitiveType::Long)).into(),
            NestedField::required(8, "token", p(PrimitiveType::Long)).into(),
        ])
        .build()
        .map_err(|e| crate::error::classify(e, "building the table schema"))
}

/// Check that `schema` (a table's current schema) has dotdo's columns, in order and of dotdo's
/// types, and nothing else. Records are written by column position, so a table whose columns
/// another engine reordered, retyped, added or dropped would get values under the wrong column
/// (or lose the other engine's column in a compaction): such a table is refused, `InvalidInput`
/// naming `what` and the columns found.
pub(crate) fn check_change_schema(schema: &Schema, what: &str) -> Result<()> {
    let ours = table_schema()?;
    let found = schema.as_struct().fields();
    let same = found.len() == COLUMNS.len()
        && found.iter().zip(ours.as_struct().fields()).all(|(f, o)| f.name == o.name && f.field_type == o.field_type);
    if same {
        return Ok(());
    }
    let cols: Vec<String> = found.iter().map(|f| format!("{} {}", f.name, f.field_type)).collect();
    Err(Error::invalid(format!(
        "{what} is not (or no longer) a dotdo change table: columns {cols:?}, expected {COLUMNS:?} with dotdo's types, \
         in that order (another engine changed its schema?)"
    )))
}

/// Check that `md`'s current schema has each of dotdo's columns, by name and of dotdo's type, in
/// any order and beside other columns, and ([`check_field_ids`]) that none took another's field
/// id: what reads need (they find columns by name), so a store still opens a table another
/// engine added a column to or reordered (its appends are refused, [`check_change_table`]),
/// while a table that is not a dotdo change table at all is `InvalidInput` naming `what`.
pub(crate) fn check_readable_table(md: &iceberg::spec::TableMetadata, what: &str) -> Result<()> {
    let schema = md.current_schema();
    let ours = table_schema()?;
    let wrong: Vec<String> = ours
        .as_struct()
        .fields()
        .iter()
        .filter_map(|o| match schema.field_by_name(&o.name) {
            Some(f) if f.field_type == o.field_type => None,
            Some(f) => Some(format!("{} is {}, not {}", o.name, f.field_type, o.field_type)),
            None => Some(format!("{} is missing", o.name)),
        })
        .collect();
    if !wrong.is_empty() {
        return Err(Error::invalid(format!(
            "{what} is not (or no longer) a dotdo change table: {} (expected the columns {COLUMNS:?} with dotdo's \
             types)",
            wrong.join(", ")
        )));
    }
    check_field_ids(md, what)
}

/// [`check_change_schema`] of a table's current schema, and ([`check_field_ids`]) that none of
/// dotdo's columns took
/// another column's field id in any of the table's schemas: data files hold a column's values
/// under its field id (dotdo finds them, and prunes, by id), so in a table whose columns another
/// engine renamed into each other (`seq` and `token` swapped, say) dotdo's `seq` would read the
/// old files' tokens. `InvalidInput` naming the column.
pub(crate) fn check_change_table(md: &iceberg::spec::TableMetadata, what: &str) -> Result<()> {
    check_change_schema(md.current_schema(), what)?;
    check_field_ids(md, what)
}

/// The field-id half of [`check_change_table`], for reads (which find columns by field id, so
/// a reordered table, or a column renamed and renamed back, reads fine, but not one whose
/// columns were renamed into each other).
pub(crate) fn check_field_ids(md: &iceberg::spec::TableMetadata, what: &str) -> Result<()> {
    let current = md.current_schema();
    for name in COLUMNS {
        let id = current.field_id_by_name(name);
        for old in md.schemas_iter() {
            if let Some(was) = old.field_id_by_name(name).filter(|was| Some(*was) != id) {
                let now = id.map_or("is missing now".to_string(), |i| format!("is field {i} now"));
                return Err(Error::invalid(format!(
                    "{what} is not (or no longer) a dotdo change table: its column {name:?} {now} but was field \
                     {was} in schema {} (another engine renamed columns into each other, or dropped and re-added \
                     one; data files hold a column's values under its field id, so dotdo's column would read \
                     another's values)",
                    old.schema_id()
                )));
            }
        }
    }
    Ok(())
}

/// `bucket(do_id, buckets)`.
pub fn partition_spec(buckets: u32) -> Result<UnboundPartitionSpec> {
    Ok(UnboundPartitionSpec::builder()
        .add_partition_field(1, "do_id_bucket", Transform::Bucket(buckets))
        .map_err(|e| crate::error::classify(e, "building the partition spec"))?
        .build())
}

/// `do_id, key, seq`, ascending.
pub fn sort_order(schema: &Schema) -> Result<SortOrder> {
    let field = |id| {
        SortField::builder()
            .source_id(id)
            .transform(Transform::Identity)
            .direction(SortDirection::Ascending)
            .null_order(NullOrder::First)
            .build()
    };
    SortOrder::builder()
        .with_order_id(1)
        .with_sort_field(field(1))
        .with_sort_field(field(3))
        .with_sort_field(field(7))
        .build(schema)
        .map_err(|e| crate::error::classify(e, "building the sort order"))
}

/// Computes an object's partition bucket with iceberg's own transform (murmur3, as every Iceberg
/// engine does).
#[derive(Debug)]
pub(crate) struct Bucketer {
    f: iceberg::transform::BoxedTransformFunction,
    /// The partition spec the transform comes from, and the position of its `do_id` field: a
    /// data file's partition value is this bucket only if the file was written under that spec.
    pub(crate) spec: Option<(i32, usize)>,
}

impl Bucketer {
    pub(crate) fn new(transform: &Transform) -> Result<Self> {
        match transform {
            // iceberg's bucket function takes the hash modulo N: N = 0 would divide by zero.
            Transform::Bucket(0) => {
                return Err(Error::corrupt("the table's partition spec has bucket[0], which no engine can evaluate"))
            }
            // iceberg-rust takes N as an i32: a larger N wraps to another modulus (partition
            // values no other engine computes), and Java engines cannot read it at all.
            Transform::Bucket(n) if i32::try_from(*n).is_err() => {
                return Err(Error::corrupt(format!(
                    "the table's partition spec has bucket[{n}], above the largest bucket count engines evaluate \
                     (2^31 - 1)"
                )))
            }
            _ => {}
        }
        let f = iceberg::transform::create_transform_function(transform)
            .map_err(|e| crate::error::classify(e, "partition transform"))?;
        Ok(Bucketer { f, spec: None })
    }

    /// Which spec (id, position of the `do_id` field) this bucketer belongs to.
    pub(crate) fn with_spec(mut self, spec_id: i32, position: usize) -> Self {
        self.spec = Some((spec_id, position));
        self
    }

    pub(crate) fn bucket(&self, object: &str) -> Result<i32> {
        let d = self
            .f
            .transform_literal_result(&Datum::string(object))
            .map_err(|e| crate::error::classify(e, "partition transform"))?;
        match d.literal() {
            PrimitiveLiteral::Int(b) => Ok(*b),
            other => Err(Error::backend(format!("bucket transform returned {other:?}"))),
        }
    }
}

fn to_i64(what: &str, v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(format!("{what} {v} does not fit the table's long column")))
}

/// Build a record batch (schema with field ids, from the table) of `records`, in the given order,
/// checking keys and type names on the way (`InvalidInput`).
pub(crate) fn to_batch(schema: &ArrowSchemaRef, records: &[&ChangeRecord]) -> Result<RecordBatch> {
    let n = records.len();
    let mut do_id = StringBuilder::with_capacity(n, n * 16);
    let mut ty = StringBuilder::with_capacity(n, n * 8);
    let mut key = StringBuilder::with_capacity(n, n * 16);
    let mut value = LargeBinaryBuilder::with_capacity(n, records.iter().map(|r| r.value.len()).sum());
    let mut ts = TimestampMicrosecondBuilder::with_capacity(n);
    let mut op = StringBuilder::with_capacity(n, n * 6);
    let mut seq = Int64Builder::with_capacity(n);
    let mut token = Int64Builder::with_capacity(n);
    let mut last_type: Option<&str> = None;
    for r in records {
        dotdo_core::ids::validate_key(&r.key)?;
        // Type names repeat: validate each run once.
        if last_type != Some(r.type_name.as_str()) {
            dotdo_core::ids::validate_type_name(&r.type_name)?;
            last_type = Some(r.type_name.as_str());
        }
        do_id.append_value(r.object.as_str());
        ty.append_value(&r.type_name);
        key.append_value(&r.key);
        value.append_value(&r.value);
        ts.append_value(r.timestamp.as_micros());
        op.append_value(r.op.as_str());
        seq.append_value(to_i64("seq", r.seq)?);
        token.append_value(to_i64("token", r.token.get())?);
    }
    let tz = match schema.field(4).data_type() {
        DataType::Timestamp(_, tz) => tz.clone(),
        _ => None,
    };
    let cols: Vec<ArrayRef> = vec![
        Arc::new(do_id.finish()),
        Arc::new(ty.finish()),
        Arc::new(key.finish()),
        Arc::new(value.finish()),
        Arc::new(ts.finish().with_timezone_opt(tz)),
        Arc::new(op.finish()),
        Arc::new(seq.finish()),
        Arc::new(token.finish()),
    ];
    RecordBatch::try_new(schema.clone(), cols).map_err(|e| Error::backend(format!("building a record batch: {e}")))
}

/// Typed access to one column of a batch read back from a data file.
enum Strs<'a> {
    Utf8(&'a arrow_array::StringArray),
    Large(&'a arrow_array::LargeStringArray),
    View(&'a arrow_array::StringViewArray),
}

impl Strs<'_> {
    fn get(&self, i: usize) -> &str {
        match self {
            Strs::Utf8(a) => a.value(i),
            Strs::Large(a) => a.value(i),
            Strs::View(a) => a.value(i),
        }
    }

    fn is_null(&self, i: usize) -> bool {
        match self {
            Strs::Utf8(a) => a.is_null(i),
            Strs::Large(a) => a.is_null(i),
            Strs::View(a) => a.is_null(i),
        }
    }
}

enum Bins<'a> {
    Binary(&'a arrow_array::BinaryArray),
    Large(&'a arrow_array::LargeBinaryArray),
    View(&'a arrow_array::BinaryViewArray),
}

impl Bins<'_> {
    fn is_null(&self, i: usize) -> bool {
        match self {
            Bins::Binary(a) => a.is_null(i),
            Bins::Large(a) => a.is_null(i),
            Bins::View(a) => a.is_null(i),
        }
    }

    fn get(&self, i: usize) -> &[u8] {
        match self {
            Bins::Binary(a) => a.value(i),
            Bins::Large(a) => a.value(i),
            Bins::View(a) => a.value(i),
        }
    }
}

/// The field ids of dotdo's columns in a table's schema (its current one), by name: what data
/// files' columns are found by. Iceberg ties a column's data to its field id, not its name:
/// another engine may rename a column, write files under the new name, and rename it back.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ColumnIds([Option<i32>; COLUMNS.len()]);

impl ColumnIds {
    /// The ids of `schema`'s columns named as dotdo's (`None` for one it lacks).
    pub(crate) fn of(schema: &Schema) -> Self {
        ColumnIds(COLUMNS.map(|name| schema.field_id_by_name(name)))
    }

    fn get(&self, name: &str) -> Option<i32> {
        COLUMNS.iter().position(|c| *c == name).and_then(|i| self.0[i])
    }

    /// The leaf column of a Parquet file's schema holding dotdo's column `name`: by field id
    /// where the file records ids, else by name (a file without ids).
    pub(crate) fn parquet_column(&self, descr: &parquet::schema::types::SchemaDescriptor, name: &str) -> Option<usize> {
        let id_of = |c: &parquet::schema::types::ColumnDescPtr| {
            let info = c.self_type().get_basic_info();
            info.has_id().then(|| info.id())
        };
        let columns = descr.columns();
        match self.get(name) {
            Some(id) if columns.iter().any(|c| id_of(c).is_some()) => columns.iter().position(|c| id_of(c) == Some(id)),
            _ => columns.iter().position(|c| c.path().string() == name),
        }
    }
}

/// Column `name` of a batch read from `file`: by its field id in `ids` where the file's columns
/// carry ids (`PARQUET:field_id`), else by name.
fn column<'a>(batch: &'a RecordBatch, name: &str, file: &str, ids: &ColumnIds) -> Result<&'a ArrayRef> {
    let field_id = |f: &arrow_schema::Field| {
        f.metadata().get(parquet::arrow::PARQUET_FIELD_ID_META_KEY).and_then(|v| v.parse::<i32>().ok())
    };
    let fields = batch.schema_ref().fields();
    if let Some(id) = ids.get(name).filter(|_| fields.iter().any(|f| field_id(f).is_some())) {
        return match fields.iter().position(|f| field_id(f) == Some(id)) {
            Some(i) => Ok(batch.column(i)),
            None => Err(Error::corrupt(format!("data file {file} has no column of field id {id} ({name})"))),
        };
    }
    batch.column_by_name(name).ok_or_else(|| Error::corrupt(format!("data file {file} has no column {name}")))
}

/// `batch` with its dictionary-encoded columns decoded to their values (`None` if it has none).
/// Another writer's file may carry a dictionary type in its embedded Arrow schema (pyarrow's
/// categorical columns, added with PyIceberg's `add_files`): the reader then returns dictionary
/// arrays, which are still the strings (or bytes) the table's schema says (they were `Corrupt`).
fn without_dictionaries(batch: &RecordBatch, file: &str) -> Result<Option<RecordBatch>> {
    use arrow_schema::DataType;
    let schema = batch.schema();
    if !schema.fields().iter().any(|f| matches!(f.data_type(), DataType::Dictionary(..))) {
        return Ok(None);
    }
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (f, c) in schema.fields().iter().zip(batch.columns()) {
        match f.data_type() {
            DataType::Dictionary(_, values) => {
                let decoded = arrow_cast::cast(c, values).map_err(|e| {
                    Error::corrupt(format!("data file {file}: column {} does not decode: {e}", f.name()))
                })?;
                fields.push(f.as_ref().clone().with_data_type(values.as_ref().clone()));
                columns.push(decoded);
            }
            _ => {
                fields.push(f.as_ref().clone());
                columns.push(c.clone());
            }
        }
    }
    let schema = std::sync::Arc::new(arrow_schema::Schema::new_with_metadata(fields, schema.metadata().clone()));
    RecordBatch::try_new(schema, columns)
        .map(Some)
        .map_err(|e| Error::corrupt(format!("data file {file}: dictionary columns do not decode: {e}")))
}

fn strs<'a>(batch: &'a RecordBatch, name: &str, file: &str, ids: &ColumnIds) -> Result<Strs<'a>> {
    let c = column(batch, name, file, ids)?;
    let any = c.as_any();
    if let Some(a) = any.downcast_ref::<arrow_array::StringArray>() {
        Ok(Strs::Utf8(a))
    } else if let Some(a) = any.downcast_ref::<arrow_array::LargeStringArray>() {
        Ok(Strs::Large(a))
    } else if let Some(a) = any.downcast_ref::<arrow_array::StringViewArray>() {
        Ok(Strs::View(a))
    } else {
        Err(Error::corrupt(format!("data file {file}: column {name} is {} not a string", c.data_type())))
    }
}

fn bins<'a>(batch: &'a RecordBatch, name: &str, file: &str, ids: &ColumnIds) -> Result<Bins<'a>> {
    let c = column(batch, name, file, ids)?;
    let any = c.as_any();
    if let Some(a) = any.downcast_ref::<arrow_array::BinaryArray>() {
        Ok(Bins::Binary(a))
    } else if let Some(a) = any.downcast_ref::<arrow_array::LargeBinaryArray>() {
        Ok(Bins::Large(a))
    } else if let Some(a) = any.downcast_ref::<arrow_array::BinaryViewArray>() {
        Ok(Bins::View(a))
    } else {
        Err(Error::corrupt(format!("data file {file}: column {name} is {} not binary", c.data_type())))
    }
}

fn longs<'a>(batch: &'a RecordBatch, name: &str, file: &str, ids: &ColumnIds) -> Result<&'a arrow_array::Int64Array> {
    let c = column(batch, name, file, ids)?;
    c.as_any()
        .downcast_ref::<arrow_array::Int64Array>()
        .ok_or_else(|| Error::corrupt(format!("data file {file}: column {name} is {} not a long", c.data_type())))
}

/// Rows of `batch` (read from `file`) for which `keep(do_id, key)` holds, as change records.
pub(crate) fn from_batch(
    batch: &RecordBatch,
    file: &str,
    ids: &ColumnIds,
    mut keep: impl FnMut(&str, &str) -> bool,
    out: &mut Vec<ChangeRecord>,
) -> Result<()> {
    let plain = without_dictionaries(batch, file)?;
    let batch = plain.as_ref().unwrap_or(batch);
    let do_id = strs(batch, "do_id", file, ids)?;
    let ty = strs(batch, "type", file, ids)?;
    let key = strs(batch, "key", file, ids)?;
    let value = bins(batch, "value", file, ids)?;
    let op = strs(batch, "op", file, ids)?;
    let seq = longs(batch, "seq", file, ids)?;
    let token = longs(batch, "token", file, ids)?;
    let tsc = column(batch, "timestamp", file, ids)?;
    let ts = tsc
        .as_any()
        .downcast_ref::<arrow_array::TimestampMicrosecondArray>()
        .ok_or_else(|| Error::corrupt(format!("data file {file}: timestamp column is {}", tsc.data_type())))?;
    let mut last_obj: Option<ObjectId> = None;
    for i in 0..batch.num_rows() {
        let (d, k) = (do_id.get(i), key.get(i));
        if !keep(d, k) {
            continue;
        }
        // Every column is required; another engine's writer may still have put a null (read
        // back as "" or empty bytes, it would pass for a value).
        if seq.is_null(i)
            || token.is_null(i)
            || ts.is_null(i)
            || do_id.is_null(i)
            || key.is_null(i)
            || ty.is_null(i)
            || op.is_null(i)
            || value.is_null(i)
        {
            return Err(Error::corrupt(format!("data file {file}: null in a required column at row {i}")));
        }
        // What no hot store could take back (restores would refuse it) is damage, named here.
        dotdo_core::ids::validate_key(k)
            .and_then(|()| dotdo_core::ids::validate_type_name(ty.get(i)))
            .and_then(|()| dotdo_core::ids::validate_value(value.get(i)))
            .map_err(|e| Error::corrupt(format!("data file {file}: row {i}: {e}")))?;
        let object = match &last_obj {
            Some(o) if o.as_str() == d => o.clone(),
            _ => {
                let o = ObjectId::new(d).map_err(|e| Error::corrupt(format!("data file {file}: {e}")))?;
                last_obj = Some(o.clone());
                o
            }
        };
        // Sequence numbers dotdo issues are 1..=MAX_SEQ, tokens at most FencingToken::MAX (0, NONE,
        // in tables a pipeline wrote with it before appends checked record tokens); a larger one
        // (another writer's) would surface later as a restore refused for a bad argument, naming
        // no file.
        let s =
            u64::try_from(seq.value(i)).ok().filter(|s| (1..=dotdo_core::MAX_SEQ).contains(s)).ok_or_else(|| {
                Error::corrupt(format!("data file {file}: row {i}: seq {} is not one dotdo issues", seq.value(i)))
            })?;
        let t = u64::try_from(token.value(i)).ok().filter(|t| *t <= FencingToken::MAX.get()).ok_or_else(|| {
            Error::corrupt(format!("data file {file}: row {i}: token {} is not one dotdo issues", token.value(i)))
        })?;
        out.push(ChangeRecord {
            object,
            seq: s,
            key: k.to_string(),
            op: Op::parse(op.get(i)).map_err(|e| e.context(format!("data file {file}")))?,
            value: Bytes::copy_from_slice(value.get(i)),
            token: FencingToken::new(t),
            timestamp: Timestamp::from_micros(ts.value(i)),
            type_name: ty.get(i).to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_transform_of_zero_is_corrupt_not_a_division_by_zero() {
        let e = Bucketer::new(&Transform::Bucket(0)).expect_err("bucket[0]");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt);
        let e = Bucketer::new(&Transform::Bucket(3_000_000_000)).expect_err("bucket[3e9] wraps as an i32");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{e}");
        assert!(Bucketer::new(&Transform::Bucket(i32::MAX as u32)).is_ok());
        assert!(Bucketer::new(&Transform::Bucket(16)).expect("bucket[16]").bucket("o").is_ok());
    }

    #[test]
    fn records_roundtrip_through_a_batch() {
        let schema = table_schema().expect("schema");
        let ids = ColumnIds::of(&schema);
        let arrow = Arc::new(iceberg::arrow::schema_to_arrow_schema(&schema).expect("arrow"));
        let o = ObjectId::new("o").expect("id");
        let r = ChangeRecord {
            object: o.clone(),
            seq: 7,
            key: "k".into(),
            op: Op::Delete,
            value: Bytes::new(),
            token: FencingToken::new(3),
            timestamp: Timestamp::from_micros(42),
            type_name: "T".into(),
        };
        let b = to_batch(&arrow, &[&r]).expect("batch");
        let mut out = Vec::new();
        from_batch(&b, "mem", &ids, |d, _| d == "o", &mut out).expect("decode");
        assert_eq!(out, vec![r]);
        out.clear();
        from_batch(&b, "mem", &ids, |d, _| d == "p", &mut out).expect("decode");
        assert!(out.is_empty());
        // A seq or token no dotdo writer issues (another writer's row) is `Corrupt` naming the
        // file, not a record whose restore is later refused as a bad argument naming none.
        let max_token = FencingToken::MAX.get();
        for (seq, token) in [(dotdo_core::MAX_SEQ + 1, 3), (0, 3), (7, max_token + 1)] {
            let bad = ChangeRecord { seq, token: FencingToken::new(token), ..out_record(&o) };
            let b = to_batch(&arrow, &[&bad]).expect("batch");
            let e = from_batch(&b, "f.parquet", &ids, |_, _| true, &mut Vec::new()).expect_err("not dotdo's");
            assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{seq} {token}: {e}");
            assert!(e.to_string().contains("f.parquet") && e.to_string().contains("not one dotdo issues"), "{e}");
        }
    }

    fn out_record(o: &ObjectId) -> ChangeRecord {
        ChangeRecord {
            object: o.clone(),
            seq: 1,
            key: "k".into(),
            op: Op::Put,
            value: Bytes::from_static(b"v"),
            token: FencingToken::new(1),
            timestamp: Timestamp::from_micros(42),
            type_name: "T".into(),
        }
    }

    /// Rows another engine wrote with a null in a required column, a key with a control
    /// character or an empty type name are `Corrupt` naming the file, not records restores refuse.
    #[test]
    fn nulls_and_invalid_keys_or_types_are_corrupt() {
        use arrow_array::{Int64Array, LargeBinaryArray, StringArray, TimestampMicrosecondArray};
        use arrow_schema::{Field, Schema, TimeUnit};
        let schema = Arc::new(Schema::new(vec![
            Field::new("do_id", DataType::Utf8, true),
            Field::new("type", DataType::Utf8, true),
            Field::new("key", DataType::Utf8, true),
            Field::new("value", DataType::LargeBinary, true),
            Field::new("timestamp", DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into())), true),
            Field::new("op", DataType::Utf8, true),
            Field::new("seq", DataType::Int64, true),
            Field::new("token", DataType::Int64, true),
        ]));
        let batch = |ty: Option<&str>, key: Option<&str>, value: Option<&[u8]>| {
            let cols: Vec<ArrayRef> = vec![
                Arc::new(StringArray::from(vec![Some("o")])),
                Arc::new(StringArray::from(vec![ty])),
                Arc::new(StringArray::from(vec![key])),
                Arc::new(LargeBinaryArray::from(vec![value])),
                Arc::new(TimestampMicrosecondArray::from(vec![Some(1)]).with_timezone("+00:00")),
                Arc::new(StringArray::from(vec![Some("put")])),
                Arc::new(Int64Array::from(vec![Some(1)])),
                Arc::new(Int64Array::from(vec![Some(1)])),
            ];
            RecordBatch::try_new(schema.clone(), cols).expect("batch")
        };
        // No field ids in these batches: columns are found by name.
        let ids = ColumnIds::of(&table_schema().expect("schema"));
        let mut out = Vec::new();
        from_batch(&batch(Some("T"), Some("k"), Some(b"v")), "f.parquet", &ids, |_, _| true, &mut out)
            .expect("valid row");
        assert_eq!(out.len(), 1);
        for (what, b) in [
            ("null key", batch(Some("T"), None, Some(b"v"))),
            ("null type", batch(None, Some("k"), Some(b"v"))),
            ("null value", batch(Some("T"), Some("k"), None)),
            ("key with a control character", batch(Some("T"), Some("k\u{7}"), Some(b"v"))),
            ("empty type name", batch(Some(""), Some("k"), Some(b"v"))),
        ] {
            let e = from_batch(&b, "f.parquet", &ids, |_, _| true, &mut out).expect_err(what);
            assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{what}: {e}");
            assert!(e.to_string().contains("f.parquet"), "{what}: names the file: {e}");
        }
    }

    #[test]
    fn buckets_are_stable_and_in_range() {
        let b = Bucketer::new(&Transform::Bucket(16)).expect("bucketer");
        let x = b.bucket("user:1").expect("bucket");
        assert!((0..16).contains(&x));
        assert_eq!(x, b.bucket("user:1").expect("bucket"));
        // Iceberg spec test vector: bucket(string "iceberg", 16) uses murmur3 = 1210000089.
        assert_eq!(b.bucket("iceberg").expect("bucket"), 1_210_000_089 % 16);
    }
}
