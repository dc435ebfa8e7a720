//! Iceberg tables with a **user schema**, appended in numbered batches exactly once.
//!
//! This is the commit path for streams of arbitrary Arrow data (dotdo-pipelines'
//! `ArrowPipeline`). Each append carries a *stream* name and a *batch id*; the snapshot summary
//! records, for every stream that ever wrote to the table, the highest batch id committed
//! (`dotdo.stream.<name>`, carried forward by every commit). An append whose id is at or below
//! the stream's mark is skipped, so a retry or a crash replay never duplicates rows. Commits are
//! pinned to the table version the marks were read from (iceberg's own retry is off); a conflict
//! or an unknown outcome re-reads the marks before trying again.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use iceberg::spec::{DataFileFormat, PartitionKey, Struct};
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::location_generator::{DefaultFileNameGenerator, DefaultLocationGenerator};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::{IcebergWriter, IcebergWriterBuilder};
use iceberg::{NamespaceIdent, TableCreation, TableIdent};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use dotdo_core::{Error, ErrorKind, Result, SnapshotId};

use crate::error::classify;
use crate::store::RETRY_PROP;
use crate::IcebergColdStore;

const MARK_PREFIX: &str = "dotdo.stream.";

/// What an [`ArrowTable::append`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArrowCommit {
    /// The snapshot created, `None` if the batch was already committed (a replay), or held no
    /// rows (then nothing is committed or recorded: the stream's mark stays where it was).
    pub snapshot: Option<SnapshotId>,
    /// Rows written by this call (0 for a replay, or for batches without rows).
    pub rows: u64,
}

/// An Iceberg table with a user schema in an [`IcebergColdStore`]'s catalog and warehouse.
#[derive(Clone, Debug)]
pub struct ArrowTable {
    store: IcebergColdStore,
    ident: TableIdent,
    /// The user's schema (what `append` accepts).
    user: SchemaRef,
    /// The same schema with Iceberg field ids, as the Parquet writer wants it.
    iceberg_arrow: SchemaRef,
    /// Why this handle's batches cannot be appended any more, as its last append found (see
    /// [`ArrowTable::shape_refused`]); shared by the handle's clones.
    shape_refused: Arc<parking_lot::Mutex<Option<String>>>,
}

/// `data` with the type `to`, which equals its own but for nested fields' names and metadata (a
/// user's `List(Field("item", …))` is Iceberg's `List(Field("element", …))` with a field id):
/// the buffers are the same, only the type is relabelled, children included. Arrow compares
/// types strictly when a batch is built, so without this no nested column could be appended.
fn relabel(
    data: arrow_data::ArrayData,
    to: &arrow_schema::DataType,
) -> std::result::Result<arrow_data::ArrayData, arrow_schema::ArrowError> {
    use arrow_schema::DataType as T;
    if data.data_type() == to {
        return Ok(data);
    }
    let child_types: Vec<&T> = match to {
        T::List(f) | T::LargeList(f) | T::FixedSizeList(f, _) | T::Map(f, _) | T::ListView(f) | T::LargeListView(f) => {
            vec![f.data_type()]
        }
        T::Struct(fields) => fields.iter().map(|f| f.data_type()).collect(),
        _ => Vec::new(),
    };
    let children = if child_types.len() == data.child_data().len() {
        data.child_data()
            .iter()
            .zip(child_types)
            .map(|(c, t)| relabel(c.clone(), t))
            .collect::<std::result::Result<Vec<_>, _>>()?
    } else {
        data.child_data().to_vec()
    };
    data.into_builder().data_type(to.clone()).child_data(children).build()
}

/// A column name `schema` uses more than once.
fn repeated_name(schema: &arrow_schema::Schema) -> Option<&str> {
    let mut names = std::collections::HashSet::new();
    schema.fields().iter().map(|f| f.name().as_str()).find(|n| !names.insert(*n))
}

/// Whether a column of type `from` may be written as `to` by widening it, as Iceberg's type
/// promotions allow (`widen_column`): int to long, float to double, a decimal to a larger
/// precision of the same scale.
fn widens(from: &arrow_schema::DataType, to: &arrow_schema::DataType) -> bool {
    use arrow_schema::DataType as T;
    match (from, to) {
        (T::Int32, T::Int64) | (T::Float32, T::Float64) => true,
        (T::Decimal128(p0, s0), T::Decimal128(p1, s1)) => s0 == s1 && p0 <= p1,
        _ => false,
    }
}

/// Whether `t` is or holds a struct without fields.
fn has_empty_struct(t: &arrow_schema::DataType) -> bool {
    use arrow_schema::DataType as T;
    match t {
        T::Struct(fields) => fields.is_empty() || fields.iter().any(|f| has_empty_struct(f.data_type())),
        T::List(f) | T::LargeList(f) | T::FixedSizeList(f, _) | T::Map(f, _) => has_empty_struct(f.data_type()),
        _ => false,
    }
}

/// `batch` in the shape of `target`, columns matched by name: a column the batch lacks is all
/// nulls if `target` allows it (a column added since the batch was made), a column of a type
/// `target` widened is cast (a batch made before `widen_column`); `None` if the batch has a
/// column `target` lacks, a column of another type, or lacks a required one, or if a column
/// (or a field nested in one) both name with an Iceberg field id has another id in `target`
/// (dropped and added again under the same name since: another column).
fn conform(batch: &RecordBatch, target: &SchemaRef) -> Option<RecordBatch> {
    let schema = batch.schema_ref();
    if schema.fields().iter().any(|f| target.field_with_name(f.name()).is_err()) {
        return None;
    }
    // A name the batch uses twice: which column is meant cannot be known (one would be dropped).
    if repeated_name(schema).is_some() {
        return None;
    }
    let field_id = |f: &arrow_schema::Field| f.metadata().get(parquet::arrow::PARQUET_FIELD_ID_META_KEY).cloned();
    let mut columns = Vec::with_capacity(target.fields().len());
    for field in target.fields() {
        match schema.index_of(field.name()) {
            Ok(i) => {
                if let (Some(was), Some(now)) = (field_id(schema.field(i)), field_id(field)) {
                    if was != now {
                        return None;
                    }
                }
                // The same within the column (a struct's field dropped and added again).
                if !same_nested_ids(schema.field(i).data_type(), field.data_type()) {
                    return None;
                }
                let mut column = batch.column(i).clone();
                let nulls_ok = field.is_nullable() || column.null_count() == 0;
                if !nulls_ok {
                    return None;
                }
                if !dotdo_core::arrow_shape::same_type(column.data_type(), field.data_type()) {
                    if !widens(column.data_type(), field.data_type()) {
                        return None;
                    }
                    column = arrow_cast::cast(&column, field.data_type()).ok()?;
                }
                // The target's own names for nested fields (`item` / `element`, map entries):
                // arrow builds a batch only from exactly equal types.
                if column.data_type() != field.data_type() {
                    column = arrow_array::make_array(relabel(column.to_data(), field.data_type()).ok()?);
                }
                columns.push(column);
            }
            Err(_) if field.is_nullable() => {
                columns.push(arrow_array::new_null_array(field.data_type(), batch.num_rows()))
            }
            Err(_) => return None,
        }
    }
    RecordBatch::try_new(target.clone(), columns).ok()
}

/// Whether the nested fields `a` and `b` hold carry the same Iceberg field id wherever both
/// carry one (struct fields matched by name, list elements and map entries by position).
fn same_nested_ids(a: &arrow_schema::DataType, b: &arrow_schema::DataType) -> bool {
    use arrow_schema::DataType as T;
    let id = |f: &arrow_schema::Field| f.metadata().get(parquet::arrow::PARQUET_FIELD_ID_META_KEY).cloned();
    let agree = |x: &arrow_schema::Field, y: &arrow_schema::Field| {
        id(x).zip(id(y)).is_none_or(|(i, j)| i == j) && same_nested_ids(x.data_type(), y.data_type())
    };
    match (a, b) {
        (T::Struct(xs), T::Struct(ys)) => {
            xs.iter().all(|x| ys.iter().find(|y| y.name() == x.name()).is_none_or(|y| agree(x, y)))
        }
        (
            T::List(x) | T::LargeList(x) | T::FixedSizeList(x, _),
            T::List(y) | T::LargeList(y) | T::FixedSizeList(y, _),
        )
        | (T::Map(x, _), T::Map(y, _)) => agree(x, y),
        _ => true,
    }
}

impl IcebergColdStore {
    /// Open the table `namespace.name` with the user schema `schema` (created unpartitioned if
    /// missing) in this store's catalog and warehouse. An existing table with another shape is
    /// `InvalidInput`, and so is a schema with a column type Iceberg cannot store exactly (it
    /// would read back as another Arrow type, e.g. `Binary` as `LargeBinary`): checked before
    /// the table is created.
    pub async fn arrow_table(&self, namespace: &[&str], name: &str, schema: SchemaRef) -> Result<ArrowTable> {
        crate::store::validate_table_name(namespace.iter().copied(), name)?;
        let ns = NamespaceIdent::from_strs(namespace.iter().copied())
            .map_err(|e| Error::invalid(format!("table namespace {namespace:?}: {e}")))?;
        let ident = TableIdent::new(ns.clone(), name.to_string());
        let what = format!("table {ident}");
        // A batch of no columns has no row count to append, and a name used twice would have its
        // second column dropped when batches are matched to the table by name.
        if schema.fields().is_empty() {
            return Err(Error::invalid(format!("{what}: the schema has no columns")));
        }
        if let Some(dup) = repeated_name(&schema) {
            return Err(Error::invalid(format!("{what}: the schema names column {dup:?} twice")));
        }
        // Parquet cannot write a struct of no fields: every append would fail.
        if let Some(col) = schema.fields().iter().find(|f| has_empty_struct(f.data_type())) {
            return Err(Error::invalid(format!(
                "{what}: column {} holds a struct without fields, which Parquet cannot store",
                col.name()
            )));
        }
        let ischema = iceberg::arrow::arrow_schema_to_schema_auto_assign_ids(&schema)
            .map_err(|e| Error::invalid(format!("{what}: the schema has no Iceberg form: {e}")))?;
        let back = iceberg::arrow::schema_to_arrow_schema(&ischema)
            .map_err(|e| Error::invalid(format!("{what}: the schema has no Iceberg form: {e}")))?;
        if !dotdo_core::arrow_shape::same_shape(&back, &schema) {
            let differ: Vec<String> = schema
                .fields()
                .iter()
                .zip(back.fields())
                .filter(|(a, b)| !dotdo_core::arrow_shape::same_type(a.data_type(), b.data_type()))
                .map(|(a, b)| format!("{} {} (stored as {})", a.name(), a.data_type(), b.data_type()))
                .collect();
            return Err(Error::invalid(format!(
                "{what}: columns without an exact Iceberg type: {}; use the Arrow type each is stored as",
                differ.join(", ")
            )));
        }
        let catalog = self.catalog();
        let table = match crate::error::load_table(&*catalog, &ident).await {
            Ok(t) => t,
            Err(e) if matches!(e.kind(), iceberg::ErrorKind::TableNotFound | iceberg::ErrorKind::NamespaceNotFound) => {
                // Before anything is created (the namespace included).
                if let Some(col) = schema.fields().iter().find(|f| nanosecond_timestamps(f.data_type())) {
                    return Err(v3_only(&what, col.name(), col.data_type()));
                }
                if !catalog.namespace_exists(&ns).await.map_err(|e| classify(e, &what))? {
                    crate::store::check_new_namespace(&ns)?;
                    match catalog.create_namespace(&ns, HashMap::new()).await {
                        Ok(_) => {}
                        Err(e) if e.kind() == iceberg::ErrorKind::NamespaceAlreadyExists => {}
                        // Another process created it meanwhile (the SQL catalog reports the
                        // unique-key clash as an unexpected error), as for the change table.
                        Err(e) => {
                            if !catalog.namespace_exists(&ns).await.unwrap_or(false) {
                                return Err(classify(e, &what));
                            }
                        }
                    }
                }
                let mut props = HashMap::from([
                    (RETRY_PROP.to_string(), "0".to_string()),
                    ("write.format.default".to_string(), "parquet".to_string()),
                    ("write.parquet.compression-codec".to_string(), "zstd".to_string()),
                ]);
                if let Some(min) = self.inner.settings.cleanup_minimum_ms() {
                    props.insert(crate::MIN_CLEANUP_PROP.to_string(), min.to_string());
                }
                let creation = TableCreation::builder().name(name.to_string()).schema(ischema);
                // Like the change table: never in another table's directory.
                let placing = crate::store::Placing { verifier: self.inner.verifier.as_ref(), root: &self.inner.root };
                let at =
                    crate::store::new_table_location(&*catalog, &ident, &self.inner.settings.catalog_name, placing)
                        .await?;
                let creation = match at {
                    Some(location) => creation.location(location).properties(props).build(),
                    None => creation.properties(props).build(),
                };
                match catalog.create_table(&ns, creation).await {
                    Ok(t) => {
                        crate::store::confirm_created(&*catalog, self.inner.verifier.as_ref(), &ident, t, &what).await?
                    }
                    Err(e) if e.kind() == iceberg::ErrorKind::TableAlreadyExists => {
                        crate::error::load_table(&*catalog, &ident).await.map_err(|e| classify(e, &what))?
                    }
                    // Another process created it meanwhile (the SQL catalog reports the
                    // unique-key clash as an unexpected error): opened as it is (its schema is
                    // checked below), as for the change table.
                    Err(e) => match crate::error::load_table(&*catalog, &ident).await {
                        Ok(t) => t,
                        Err(_) => return Err(classify(e, &what)),
                    },
                }
            }
            Err(e) => return Err(classify(e, &what)),
        };
        let iceberg_arrow = Arc::new(
            iceberg::arrow::schema_to_arrow_schema(table.metadata().current_schema())
                .map_err(|e| classify(e, &what))?,
        );
        if !dotdo_core::arrow_shape::same_shape(&iceberg_arrow, &schema) {
            return Err(Error::invalid(format!("{what} exists with another schema: {iceberg_arrow:?}")));
        }
        check_unpartitioned(&table, &what)?;
        // As on the change table: every cleanup keeps to the largest cleanup minimum of the
        // stores writing the table (their compactions commit files up to half of it old).
        crate::store::set_dotdo_properties(
            &*catalog,
            self.inner.verifier.as_ref(),
            &ident,
            table,
            &self.inner.settings,
            false,
        )
        .await?;
        Ok(ArrowTable { store: self.clone(), ident, user: schema, iceberg_arrow, shape_refused: Default::default() })
    }
}

/// dotdo writes user tables unpartitioned: a table another engine created (or re-specced)
/// with a partition spec is refused, `InvalidInput`. (Its files would be written without
/// partition values, which the manifest writer cannot summarise: a panic on the SQL catalog,
/// invalid metadata elsewhere.)
pub(crate) fn check_unpartitioned(table: &Table, what: &str) -> Result<()> {
    let spec = table.metadata().default_partition_spec();
    if spec.fields().is_empty() {
        return Ok(());
    }
    let fields: Vec<String> = spec.fields().iter().map(|f| format!("{}({})", f.transform, f.name)).collect();
    Err(Error::invalid(format!(
        "{what} is partitioned ({}); dotdo appends to and compacts unpartitioned user tables only",
        fields.join(", ")
    )))
}

/// Whether `dt` is or holds an Arrow timestamp in nanoseconds: Iceberg's `timestamp_ns` /
/// `timestamptz_ns`, which only format version 3 has (dotdo creates version 2 tables; engines
/// refuse such a column in a version 2 table, and Spark has no nanosecond type at all).
fn nanosecond_timestamps(dt: &arrow_schema::DataType) -> bool {
    use arrow_schema::DataType as D;
    match dt {
        D::Timestamp(arrow_schema::TimeUnit::Nanosecond, _) => true,
        D::List(f) | D::LargeList(f) | D::FixedSizeList(f, _) | D::Map(f, _) => nanosecond_timestamps(f.data_type()),
        D::Struct(fields) => fields.iter().any(|f| nanosecond_timestamps(f.data_type())),
        _ => false,
    }
}

/// The refusal of a nanosecond timestamp column `name` in a version 2 table.
fn v3_only(what: &str, name: &str, dt: &arrow_schema::DataType) -> Error {
    Error::invalid(format!(
        "{what}: column {name} ({dt}) holds nanosecond timestamps, which Iceberg has only from format \
         version 3 (this table is version 2); store them as Timestamp(Microsecond, ..)"
    ))
}

/// The Iceberg type of `dt`, if it converts back to exactly `dt` (what appends will check).
fn round_trip_type(dt: &arrow_schema::DataType, what: &str) -> Result<iceberg::spec::Type> {
    let ty = iceberg::arrow::arrow_type_to_type(dt)
        .map_err(|e| Error::invalid(format!("{what}: {dt} has no Iceberg type: {e}")))?;
    match iceberg::arrow::type_to_arrow_type(&ty) {
        Ok(back) if dotdo_core::arrow_shape::same_type(&back, dt) => Ok(ty),
        _ => Err(Error::invalid(format!("{what}: {dt} has no exact Iceberg type (use {ty}'s Arrow type)"))),
    }
}

/// Data files an append attempt wrote, for a later attempt to reuse: the table (uuid), spec and
/// schema they were written for, the files, and when their writing began.
type WrittenFiles = ((uuid::Uuid, i32, i32), Vec<iceberg::spec::DataFile>, crate::store::WriteStart);

/// Arrow data per parallel writer of a user-table append: one holding at least twice this is
/// split into as many contiguous row ranges (equal row counts) as it holds
/// this much, written side by side, one task each, up to the machine's parallelism (a Parquet
/// encode is single-threaded per file).
const PARALLEL_WRITE_BYTES: usize = 16 << 20;

/// The longest string or binary value, in bytes, that a user table's Parquet files keep whole
/// as a column's min/max statistics (and so as its manifest bounds). Parquet's truncated
/// statistics are inexact, which iceberg-rust drops from the bounds (see [`write_user_files`]),
/// so the choice is whole or none: whole, a 10 MiB blob was stored three times per row group
/// (data, footer min, footer max) and twice more in its manifest entry, and a value over
/// 100 MB made a footer pyarrow refuses to read by default.
pub(crate) const MAX_STATISTICS_VALUE_BYTES: usize = 256;

/// The Parquet columns (leaves, by path) of `batches` holding a string or binary value longer
/// than [`MAX_STATISTICS_VALUE_BYTES`]: written without statistics. Leaves are matched to the
/// Parquet schema in its (depth-first) order; a layout that does not match leaves every
/// variable-length byte column without statistics.
fn long_value_columns(batches: &[RecordBatch]) -> Vec<ColumnPath> {
    let Some(first) = batches.first() else { return Vec::new() };
    // A schema parquet cannot convert fails the write itself, with its own error.
    let Ok(descr) = parquet::arrow::ArrowSchemaConverter::new().convert(first.schema().as_ref()) else {
        return Vec::new();
    };
    let mut longest = vec![0usize; descr.num_columns()];
    for b in batches {
        let mut leaves = Vec::with_capacity(longest.len());
        for c in b.columns() {
            leaf_arrays(c.as_ref(), &mut leaves);
        }
        if leaves.len() != longest.len() {
            return descr
                .columns()
                .iter()
                .filter(|c| c.physical_type() == parquet::basic::Type::BYTE_ARRAY)
                .map(|c| c.path().clone())
                .collect();
        }
        for (l, a) in longest.iter_mut().zip(leaves) {
            *l = (*l).max(longest_value(a));
        }
    }
    descr
        .columns()
        .iter()
        .zip(longest)
        .filter(|(_, l)| *l > MAX_STATISTICS_VALUE_BYTES)
        .map(|(c, _)| c.path().clone())
        .collect()
}

/// The leaf (non-nested) arrays of `a`, depth first: the order of its Parquet columns.
fn leaf_arrays<'a>(a: &'a dyn arrow_array::Array, out: &mut Vec<&'a dyn arrow_array::Array>) {
    use arrow_array::cast::AsArray;
    use arrow_schema::DataType;
    match a.data_type() {
        DataType::Struct(_) => a.as_struct().columns().iter().for_each(|c| leaf_arrays(c.as_ref(), out)),
        DataType::List(_) => leaf_arrays(a.as_list::<i32>().values().as_ref(), out),
        DataType::LargeList(_) => leaf_arrays(a.as_list::<i64>().values().as_ref(), out),
        DataType::FixedSizeList(..) => leaf_arrays(a.as_fixed_size_list().values().as_ref(), out),
        DataType::Map(..) => {
            let m = a.as_map();
            leaf_arrays(m.keys().as_ref(), out);
            leaf_arrays(m.values().as_ref(), out);
        }
        _ => out.push(a),
    }
}

/// The longest string or binary value of `a` in bytes (0 for other types; values under null
/// slots or outside a slice count too: an upper bound).
fn longest_value(a: &dyn arrow_array::Array) -> usize {
    use arrow_array::cast::AsArray;
    use arrow_array::OffsetSizeTrait;
    use arrow_schema::DataType;
    fn longest<O: OffsetSizeTrait>(offsets: &[O]) -> usize {
        offsets.windows(2).map(|w| (w[1] - w[0]).as_usize()).max().unwrap_or(0)
    }
    match a.data_type() {
        DataType::Utf8 => longest(a.as_string::<i32>().value_offsets()),
        DataType::LargeUtf8 => longest(a.as_string::<i64>().value_offsets()),
        DataType::Binary => longest(a.as_binary::<i32>().value_offsets()),
        DataType::LargeBinary => longest(a.as_binary::<i64>().value_offsets()),
        DataType::FixedSizeBinary(n) => usize::try_from(*n).unwrap_or(0),
        DataType::Utf8View => a.as_string_view().lengths().max().map_or(0, |l| l as usize),
        DataType::BinaryView => a.as_binary_view().lengths().max().map_or(0, |l| l as usize),
        _ => 0,
    }
}

/// Write `batches` (already labelled with the table's Iceberg schema) as ZSTD Parquet data files
/// of about `target` bytes into the unpartitioned user table `table`: the files in row order, a
/// large write in contiguous row ranges encoded in parallel ([`PARALLEL_WRITE_BYTES`]). If any
/// range fails, the files of the others are deleted and the first error is returned.
pub(crate) async fn write_user_files(
    store: &IcebergColdStore,
    table: &Table,
    batches: &[RecordBatch],
    target: usize,
    parallel: bool,
    what: &str,
) -> Result<Vec<iceberg::spec::DataFile>> {
    check_unpartitioned(table, what)?;
    let md = table.metadata();
    let level =
        ZstdLevel::try_new(store.inner.settings.zstd_level).map_err(|e| Error::invalid(format!("zstd level: {e}")))?;
    // Untruncated statistics: parquet truncates string/binary min/max over 64 bytes and marks
    // them inexact, and iceberg-rust then leaves that row group out of the file's manifest
    // bounds, so the bounds would exclude real values and every engine pruning on them (PyIceberg,
    // Spark, Trino, iceberg-rust's own scans) would skip rows. Whole, then, but only up to
    // `MAX_STATISTICS_VALUE_BYTES`: a column holding a longer value in this write gets none
    // (see `long_value_columns`).
    // Row groups capped as the change table's are (rows and bytes): parquet's default of 1 Mi
    // rows per group, with no byte cap, made row groups of a GiB of wide rows, held whole in
    // memory by the writer and decoded whole by readers.
    let settings = &store.inner.settings;
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_statistics_truncate_length(None)
        .set_max_row_group_row_count(Some(settings.row_group_rows.max(1)))
        .set_max_row_group_bytes(Some(settings.row_group_bytes.max(1)));
    for column in long_value_columns(batches) {
        props = props.set_column_statistics_enabled(column, EnabledStatistics::None);
    }
    let props = props.build();
    let location = crate::store::data_locations(md);
    // Unpartitioned (checked above), but filed under the table's default spec: a writer without
    // a partition key gave every file spec id 0, which iceberg's own append refuses on a table
    // whose unpartitioned spec has another id (a partition field dropped).
    let key =
        PartitionKey::new(md.default_partition_spec().as_ref().clone(), md.current_schema().clone(), Struct::empty());
    // Slices of at most a row group's bytes too: parquet caps a row group's bytes only once it
    // holds rows, so the first slice into each group went in whole (32 MiB by default).
    let chunk = crate::store::write_chunk_bytes(target as u64).min(settings.row_group_bytes.max(1));
    let builder = || {
        // A name prefix per writer: unpartitioned writers side by side share one directory.
        DataFileWriterBuilder::new(RollingFileWriterBuilder::new(
            ParquetWriterBuilder::new(props.clone(), md.current_schema().clone()),
            target,
            table.file_io().clone(),
            location.clone(),
            DefaultFileNameGenerator::new(uuid::Uuid::new_v4().to_string(), None, DataFileFormat::Parquet),
        ))
    };
    // Without `parallel` (a compaction), one rolling writer: files of `target` size. Parallel
    // writers each end a file of their own, smaller than the small-file threshold on two cores
    // or more, and every compaction rewrote the previous one's output again.
    let ranges = if parallel { row_ranges(batches) } else { vec![batches.to_vec()] };
    if ranges.len() < 2 || tokio::runtime::Handle::try_current().is_err() {
        return write_range(builder(), key, chunk, batches.to_vec(), what.to_string()).await;
    }
    // A set of tasks, aborted if this future is dropped (a caller's timeout): no writer runs on
    // for an append that is gone (what it wrote is unreferenced, for the cleanup).
    let mut tasks = tokio::task::JoinSet::new();
    for (i, r) in ranges.into_iter().enumerate() {
        let write = write_range(builder(), key.clone(), chunk, r, what.to_string());
        tasks.spawn(async move { (i, write.await) });
    }
    let mut done = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        done.push(match joined {
            Ok((i, r)) => (i, Ok(r)),
            Err(join) => (usize::MAX, Err(join)),
        });
    }
    // In row order, whatever order the ranges finished in.
    done.sort_by_key(|(i, _)| *i);
    store.files_of_writers(done.into_iter().map(|(_, r)| r), what).await
}

type UserFileWriterBuilder =
    DataFileWriterBuilder<ParquetWriterBuilder, DefaultLocationGenerator, DefaultFileNameGenerator>;

/// Write one range's batches with its own rolling writer, in slices of at most about `chunk`
/// bytes: the rolling writer starts a new file only between the batches it is given, so a
/// large batch written whole made one file of it whatever the target file size said.
async fn write_range(
    builder: UserFileWriterBuilder,
    key: PartitionKey,
    chunk: usize,
    batches: Vec<RecordBatch>,
    what: String,
) -> Result<Vec<iceberg::spec::DataFile>> {
    let failed = |e| crate::error::classify_write(e, &what);
    let mut w = builder.build(Some(key)).await.map_err(failed)?;
    for b in batches {
        for piece in byte_slices(&b, chunk) {
            w.write(piece).await.map_err(failed)?;
        }
    }
    w.close().await.map_err(failed)
}

/// `batch` cut into consecutive slices of about `max_bytes` of row data each (one row alone may
/// hold more); slices share the batch's buffers.
fn byte_slices(batch: &RecordBatch, max_bytes: usize) -> Vec<RecordBatch> {
    let rows = batch.num_rows();
    let bytes: usize = batch.columns().iter().map(|c| dotdo_core::arrow_size::rows_bytes(&c.to_data())).sum();
    if rows <= 1 || bytes <= max_bytes {
        return vec![batch.clone()];
    }
    let per = usize::try_from(rows as u128 * max_bytes.max(1) as u128 / bytes as u128).unwrap_or(rows).max(1);
    (0..rows).step_by(per).map(|from| batch.slice(from, per.min(rows - from))).collect()
}

/// `batches` cut into contiguous row ranges of equal row counts, one per parallel
/// writer: as many as [`PARALLEL_WRITE_BYTES`] allows, at most the machine's parallelism (one
/// range, all of `batches`, for a small write). Slices share the batches' buffers.
fn row_ranges(batches: &[RecordBatch]) -> Vec<Vec<RecordBatch>> {
    // The bytes the rows hold (a slice of a larger batch, or a buffer grown by doubling, holds
    // more memory than its rows).
    let bytes: usize =
        batches.iter().flat_map(|b| b.columns()).map(|c| dotdo_core::arrow_size::rows_bytes(&c.to_data())).sum();
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let n = (bytes / PARALLEL_WRITE_BYTES).clamp(1, cores).min(rows.max(1));
    if n == 1 {
        return vec![batches.to_vec()];
    }
    let per = rows.div_ceil(n);
    let (mut ranges, mut current, mut in_range) = (Vec::with_capacity(n), Vec::new(), 0);
    for b in batches {
        let mut offset = 0;
        while offset < b.num_rows() {
            let take = (per - in_range).min(b.num_rows() - offset);
            current.push(b.slice(offset, take));
            offset += take;
            in_range += take;
            if in_range == per {
                ranges.push(std::mem::take(&mut current));
                in_range = 0;
            }
        }
    }
    if !current.is_empty() {
        ranges.push(current);
    }
    ranges
}

/// Stream marks recorded in a snapshot's summary, as stored (each stream's mark is checked only
/// when that stream is asked for: one foreign or damaged mark does not block the others).
struct Marks {
    raw: HashMap<String, String>,
    snapshot: i64,
}

impl Marks {
    /// The mark of `stream` (0 if none).
    fn get(&self, stream: &str) -> Result<u64> {
        let Some(v) = self.raw.get(stream) else { return Ok(0) };
        // Batch ids are counted up from 1 by one writer; a mark that is not a number, or beyond
        // any count a writer reaches (where `mark + 1` could overflow), was not written by dotdo.
        match v.parse::<u64>() {
            Ok(m) if m <= MAX_MARK => Ok(m),
            _ => Err(Error::corrupt(format!(
                "snapshot {} summary: stream mark {MARK_PREFIX}{stream} = {v:?} is not a batch id (0..={MAX_MARK})",
                self.snapshot
            ))),
        }
    }
}

/// Stream marks recorded in the current snapshot's summary (or its nearest dotdo ancestor's, if
/// another engine wrote it).
fn marks(table: &Table) -> Result<Marks> {
    let md = table.metadata();
    let base = match md.current_snapshot() {
        Some(s) => crate::summary::user_table_base(md, s)?,
        None => {
            crate::summary::refuse_lost_head(md)?;
            None
        }
    };
    let Some(s) = base else { return Ok(Marks { raw: HashMap::new(), snapshot: 0 }) };
    let raw = s
        .summary()
        .additional_properties
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(MARK_PREFIX)?.to_string(), v.clone())))
        .collect();
    Ok(Marks { raw, snapshot: s.snapshot_id() })
}

/// The answer for batch `batch_id` of `stream` (of `rows` rows), which `table`'s mark already
/// covers: committed by an earlier attempt of this call, if one `maybe_landed` and the table
/// still has the snapshot that set the mark (its rows, its snapshot), else before the call (a
/// replay: nothing written).
fn already_committed(table: &Table, stream: &str, batch_id: u64, rows: u64, maybe_landed: bool) -> ArrowCommit {
    match maybe_landed.then(|| snapshot_marking(table, stream, batch_id)).flatten() {
        Some(snapshot) => ArrowCommit { snapshot: Some(snapshot), rows },
        None => ArrowCommit { snapshot: None, rows: 0 },
    }
}

/// The snapshot that committed batch `batch_id` of `stream`, if the table still has it: walking
/// the head's ancestors, the earliest dotdo snapshot whose mark is that batch, below which the
/// next dotdo snapshot has another mark (or none) or the history begins. Later dotdo snapshots
/// carry the mark on and snapshots of other engines hold none, so once the chain breaks at an
/// expired snapshot before that, the answer is not known (`None`): the snapshot that set the mark
/// may be the expired one.
fn snapshot_marking(table: &Table, stream: &str, batch_id: u64) -> Option<SnapshotId> {
    let key = format!("{MARK_PREFIX}{stream}");
    let md = table.metadata();
    let mut cur = md.current_snapshot().cloned();
    let mut found: Option<SnapshotId> = None;
    let mut steps = 0;
    while let Some(s) = cur {
        steps += 1;
        if steps > md.snapshots().len() + 1 {
            return None;
        }
        if crate::summary::is_dotdo(&s) {
            let mark = s.summary().additional_properties.get(&key).and_then(|v| v.parse::<u64>().ok());
            match mark {
                Some(m) if m == batch_id => found = Some(s.snapshot_id()),
                // Below the snapshot that set it: the mark was lower (or unset) here.
                _ if found.is_some() => return found,
                // Not reached yet from above (later batches), or passed (never this batch).
                Some(m) if m > batch_id => {}
                _ => return None,
            }
        }
        match s.parent_snapshot_id() {
            None => return found,
            Some(parent) => cur = Some(md.snapshot_by_id(parent)?.clone()),
        }
    }
    found
}

/// The largest stream mark (batch id) accepted in a summary.
const MAX_MARK: u64 = i64::MAX as u64;

/// A failed commit's error, if another attempt may succeed (a conflict, an unavailable store or
/// catalog, an unknown outcome the next attempt's reload settles); otherwise the error itself
/// as `Err`, which ends the retry loop.
fn worth_retrying(e: iceberg::Error, what: &str) -> Result<Error> {
    let err = classify(e, what);
    if another_attempt_may_succeed(&err) {
        Ok(err)
    } else {
        Err(err)
    }
}

/// Whether a failed schema commit is worth another attempt (see [`worth_retrying`]).
fn another_attempt_may_succeed(err: &Error) -> bool {
    matches!(err.kind(), ErrorKind::Conflict | ErrorKind::Unavailable | ErrorKind::AmbiguousOutcome)
}

impl ArrowTable {
    /// The user schema appends must have.
    pub fn schema(&self) -> SchemaRef {
        self.user.clone()
    }

    /// Why batches of this handle's schema cannot be appended any more, if its last append of
    /// rows found so: another engine changed the table's schema in a way they cannot follow (a
    /// column dropped, renamed or retyped, a nested field changed: see `append`). Open the
    /// table again with its new schema. `None` again once an append of rows through this handle
    /// (or a clone) succeeds, or [`last_batch`](Self::last_batch) finds the table's schema
    /// taking its batches again.
    pub fn shape_refused(&self) -> Option<String> {
        self.shape_refused.lock().clone()
    }

    /// The table identifier.
    pub fn ident(&self) -> &TableIdent {
        &self.ident
    }

    async fn load(&self) -> Result<Table> {
        crate::error::load_table(&*self.store.catalog(), &self.ident)
            .await
            .map_err(|e| classify(e, &format!("loading {}", self.ident)))
    }

    /// The table for commit attempt `attempt` of a retry loop: after a backoff (from the second
    /// attempt on), freshly loaded. `None` if the load failed transiently (its error is kept in
    /// `last_err` and the loop goes on); other errors end the loop.
    async fn attempt_table(&self, attempt: u32, last_err: &mut Option<Error>) -> Result<Option<Table>> {
        if attempt > 0 {
            let base = self.store.inner.settings.retry_base_delay;
            crate::store::retry_pause(base.saturating_mul(2u32.saturating_pow(attempt.min(6)))).await;
        }
        match self.load().await {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.is_retryable() => {
                *last_err = Some(e);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// `batches` in the table's Iceberg shape, or why they cannot be appended (`InvalidInput`).
    fn rebatch(&self, stream: &str, batch_id: u64, batches: &[RecordBatch]) -> Result<Vec<RecordBatch>> {
        let mut rebatched = Vec::with_capacity(batches.len());
        for b in batches {
            // No columns: the rows would be all nulls (no form of a table has no columns).
            if b.num_columns() == 0 {
                return Err(Error::invalid(format!("batch {batch_id} of stream {stream}: a batch without columns")));
            }
            // A batch made before columns were added (logged by a pipeline, say) gets nulls in
            // them.
            let conformed;
            let b = if dotdo_core::arrow_shape::same_shape(b.schema_ref(), &self.user) {
                b
            } else {
                conformed = conform(b, &self.user).ok_or_else(|| {
                    Error::invalid(format!(
                        "batch schema {:?} is not the table's {:?} (nor an older form of it missing nullable columns)",
                        b.schema(),
                        self.user
                    ))
                })?;
                &conformed
            };
            dotdo_core::arrow_shape::check_values(b)
                .map_err(|e| e.context(format!("batch {batch_id} of stream {stream}")))?;
            let relabelled = b
                .columns()
                .iter()
                .zip(self.iceberg_arrow.fields())
                .map(|(c, f)| relabel(c.to_data(), f.data_type()).map(arrow_array::make_array))
                .collect::<std::result::Result<Vec<_>, _>>()
                .and_then(|columns| RecordBatch::try_new(self.iceberg_arrow.clone(), columns))
                .map_err(|e| Error::invalid("re-labelling a batch with the table schema").with_source(e))?;
            rebatched.push(relabelled);
        }
        Ok(rebatched)
    }

    /// The highest batch id committed by `stream` (0 if none).
    pub async fn last_batch(&self, stream: &str) -> Result<u64> {
        let table = self.load().await?;
        self.recheck_shape(&table);
        marks(&table)?.get(stream)
    }

    /// Forget [`shape_refused`](Self::shape_refused) once `table`'s current schema takes this
    /// handle's batches again (the change undone, say).
    fn recheck_shape(&self, table: &Table) {
        if self.shape_refused.lock().is_none() {
            return;
        }
        let Ok(current) = iceberg::arrow::schema_to_arrow_schema(table.metadata().current_schema()) else { return };
        let current = Arc::new(current);
        if current == self.iceberg_arrow
            || conform(&RecordBatch::new_empty(self.iceberg_arrow.clone()), &current).is_some()
        {
            *self.shape_refused.lock() = None;
        }
    }

    /// Append `batches` as batch `batch_id` of `stream`, exactly once (see the module docs).
    /// Batches must have the table's user schema; ids of one stream must increase.
    ///
    /// `(stream, batch_id)` is the idempotency key: an id at or below the stream's mark is taken
    /// for a replay of a batch already committed and writes nothing. A stream name therefore
    /// belongs to **one** producer: two producers appending under the same name would each
    /// take the other's batches for their own and drop data. One append of a stream at a time,
    /// too: if a later id commits first, the earlier one is answered as a replay (0 rows) and
    /// its rows are dropped (`ArrowPipeline` appends one claim at a time).
    ///
    /// Batches without rows (none at all, or only empty ones) commit nothing and record nothing:
    /// `snapshot` `None`, `rows` 0, and [`last_batch`](Self::last_batch) unchanged.
    ///
    /// Errors: `Unavailable` and `Conflict` mean the batch did not land (retry it); an
    /// `AmbiguousOutcome` that it may have (an attempt's reply was lost, and the table could not
    /// be read back, or a later attempt failed otherwise): append the same batch id again, which
    /// answers a landed batch as a replay.
    pub async fn append(&self, stream: &str, batch_id: u64, batches: Vec<RecordBatch>) -> Result<ArrowCommit> {
        if stream.is_empty()
            || stream.len() > 128
            || !stream.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(Error::invalid(format!("stream name {stream:?}: 1..=128 ASCII letters, digits, -_.")));
        }
        if batch_id == 0 || batch_id > MAX_MARK {
            return Err(Error::invalid(format!("batch id {batch_id}: batch ids run from 1 to {MAX_MARK}")));
        }
        let rebatched = match self.rebatch(stream, batch_id, &batches) {
            Ok(rebatched) => rebatched,
            Err(refused) => {
                // A replay of a batch already committed (from a pipeline's log, made by an older
                // version or before the schema changed) is answered as committed whatever it
                // holds, as the loop below does.
                if self.last_batch(stream).await? >= batch_id {
                    return Ok(ArrowCommit { snapshot: None, rows: 0 });
                }
                return Err(refused);
            }
        };
        let rows: u64 = rebatched.iter().map(|b| b.num_rows() as u64).sum();
        let what = format!("appending batch {batch_id} of stream {stream} to {}", self.ident);
        // The files an earlier attempt wrote: under which (spec, schema), and when.
        let mut files: Option<WrittenFiles> = None;
        let attempts = self.store.inner.settings.max_commit_attempts.max(1);
        let mut last_err = None;
        // Whether an earlier attempt of this call may have committed (its reply was lost, or
        // the commit was not confirmed durable): the mark found next is then this call's own.
        let mut maybe_landed = false;
        // Once an attempt's outcome was unknown, every later failure is `AmbiguousOutcome` until
        // a read-back settles it (below): a load refused for good, a damaged mark, a schema
        // changed meanwhile say nothing about whether that attempt landed, or still lands.
        let out = async {
            // Attempts in a row refused for files too old to commit (see `too_slow_to_commit`).
            let mut too_old = crate::store::TooOldStreak::default();
            for attempt in 0..attempts {
                let Some(table) = self.attempt_table(attempt, &mut last_err).await? else { continue };
                // The mark first: a batch already committed is answered as such whatever became of
                // the schema since (a replay from a pipeline's log, or this call's own attempt whose
                // reply was lost, after another engine changed a column).
                let mut m = marks(&table)?;
                if m.get(stream)? >= batch_id {
                    // Committed by another call (an earlier one of this producer, dropped by its
                    // caller, landing late): files an attempt of this call wrote and that failed
                    // for certain are nobody's.
                    self.discard_files(files.take(), maybe_landed).await;
                    return Ok(already_committed(&table, stream, batch_id, rows, maybe_landed));
                }
                if rows == 0 {
                    return Ok(ArrowCommit { snapshot: None, rows: 0 });
                }
                // Another handle may have changed the schema since this one was opened: files are
                // written under the table's current schema (the Parquet writer takes it), so the
                // batches are given its shape, with nulls in columns added since; any other change
                // (a column dropped, renamed or retyped) is refused.
                let current = Arc::new(
                    iceberg::arrow::schema_to_arrow_schema(table.metadata().current_schema())
                        .map_err(|e| classify(e, &what))?,
                );
                let evolved;
                let to_write: &[RecordBatch] = if current == self.iceberg_arrow {
                    &rebatched
                } else {
                    evolved =
                        rebatched.iter().map(|b| conform(b, &current)).collect::<Option<Vec<_>>>().ok_or_else(|| {
                            let why = format!(
                                "the table's schema changed since this handle was opened in a way other than \
                             added nullable columns (now {:?}); open the table again with the new schema",
                                current.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>()
                            );
                            *self.shape_refused.lock() = Some(format!("{}: {why}", self.ident));
                            Error::invalid(format!("{what}: {why}"))
                        })?;
                    &evolved
                };
                // Written files are reused only under the spec they were written for (another
                // engine may evolve the partition spec between attempts), and only while younger
                // than half of `min_cleanup_retention` (a cleanup running meanwhile may judge older
                // ones unreferenced and delete them after the commit lands); otherwise rewritten.
                // (And only in the table they were written for: one dropped and created again under
                // the same name starts its spec and schema ids over.)
                let spec_id = (
                    table.metadata().uuid(),
                    table.metadata().default_partition_spec_id(),
                    table.metadata().current_schema_id(),
                );
                let young =
                    |at: &crate::store::WriteStart| self.store.uncommitted_age_past(*at, table.metadata()).is_none();
                let data = match &files {
                    Some((spec, f, at)) if *spec == spec_id && young(at) => Clone::clone(f),
                    _ => {
                        if let Some((_, old, _)) = files.take() {
                            // Written under a spec the table no longer has, or too long ago; after
                            // definite conflicts nothing references them (after an unknown outcome
                            // they may be committed, or land late: cleanup judges them once they are
                            // old enough).
                            if !maybe_landed && last_err.as_ref().is_some_and(|e: &Error| e.kind() == &ErrorKind::Conflict)
                            {
                                self.store.delete_files(old.iter().map(|f| f.file_path().to_string()).collect()).await;
                            }
                        }
                        let started = self.store.write_start();
                        let f = write_user_files(
                            &self.store,
                            &table,
                            to_write,
                            self.store.inner.settings.target_file_size,
                            true,
                            &what,
                        )
                        .await?;
                        files = Some((spec_id, f.clone(), started));
                        f
                    }
                };
                // Other streams' marks are carried on as stored.
                m.raw.insert(stream.to_string(), batch_id.to_string());
                let mut props: HashMap<String, String> =
                    m.raw.into_iter().map(|(k, v)| (format!("{MARK_PREFIX}{k}"), v)).collect();
                // Stamped as the change table's commits and every compaction are (expiry and time
                // travel go by it).
                let at = self.store.commit_time(table.metadata());
                props.insert(crate::summary::COMMITTED_AT.to_string(), at.as_micros().to_string());
                let written_at = files.as_ref().map(|(_, _, at)| *at);
                match self.store.try_commit(&table, data, props, written_at).await {
                    Ok(t) => {
                        // The catalog's answer must hold this batch's mark: one that does not (a
                        // proxy answering for the catalog, a catalog acknowledging what it did not
                        // apply) is no commit to report, and may still be one (its files stay).
                        if marks(&t).and_then(|m| m.get(stream)).is_ok_and(|m| m < batch_id) {
                            maybe_landed = true;
                            return Err(Error::new(
                                ErrorKind::AmbiguousOutcome,
                                format!("{what}: the catalog acknowledged the commit but its table lacks the batch"),
                            ));
                        }
                        let snapshot = t.metadata().current_snapshot().map(|s| s.snapshot_id());
                        *self.shape_refused.lock() = None;
                        return Ok(ArrowCommit { snapshot, rows });
                    }
                    Err(e) => {
                        let did_not_land = crate::catalog::did_not_land(&e);
                        if let Some(slow) = too_old.after(&e, &what) {
                            // (Its files were deleted by the refusal; the loop's end settles an
                            // earlier attempt of unknown outcome.)
                            last_err = Some(slow);
                            break;
                        }
                        let e = classify(e, &what);
                        match e.kind() {
                            ErrorKind::Conflict => {}
                            // Failed before anything was swapped, for good (a damaged parent
                            // manifest list, no sequence number left): no attempt fixes that.
                            // (After an earlier attempt of unknown outcome, that one may still land: the
                            // read-back below settles it.)
                            // (The loop's end reads back first if an earlier attempt may have landed,
                            // else deletes the files.)
                            _ if did_not_land && !e.is_retryable() => {
                                last_err = Some(e.context("the commit did not land"));
                                break;
                            }
                            // Failed before the swap, for now: nothing landed.
                            _ if did_not_land => {}
                            // Refused for what it is: no attempt fixes that.
                            ErrorKind::InvalidInput | ErrorKind::LimitExceeded { .. } => {
                                self.discard_files(files.take(), maybe_landed).await;
                                return Err(e);
                            }
                            // Any other failure (an unexpected answer, a broken connection) may
                            // hide a commit that landed: the next attempt reads the mark back.
                            _ => maybe_landed = true,
                        }
                        last_err = Some(e);
                    }
                }
            }
            if maybe_landed {
                // A final read-back: did an attempt land after all?
                match self.load().await {
                    Ok(table) => {
                            if marks(&table)?.get(stream)? >= batch_id {
                            return Ok(already_committed(&table, stream, batch_id, rows, true));
                        }
                    }
                    // Not known: an attempt may have landed (its files stay). `Unavailable` would
                    // tell the caller it did not, and one re-sending the rows under another batch id
                    // would write them twice.
                    Err(load) => {
                        let last = last_err.map_or_else(String::new, |e| format!("; last attempt: {e}"));
                        return Err(Error::new(
                            ErrorKind::AmbiguousOutcome,
                            format!(
                                "{what}: an attempt may have landed and the table could not be read back ({load}){last}; \
                                 append the same batch id again to find out"
                            ),
                        ));
                    }
                }
            }
            // Read back above if an attempt's outcome was unknown and not found: none landed where
            // the read-back settles it (the last error is the answer); otherwise one may land yet:
            // the outcome stays unknown.
            if self.store.inner.read_back_settles {
                maybe_landed = false;
            }
            self.discard_files(files.take(), maybe_landed).await;
            Err(last_err.unwrap_or_else(|| Error::unavailable(format!("{what}: no attempt left"))))
        }
        .await;
        if out.is_err() {
            // An early exit (the table unloadable for good, its marks damaged, its schema changed
            // in a way the batches cannot take) left the files of attempts that failed for
            // certain: nobody's. (After an unknown outcome they stay, as above.)
            self.discard_files(files.take(), maybe_landed).await;
        }
        out.map_err(|e| crate::store::unsettled(e, maybe_landed, &what, "; append the same batch id again to find out"))
    }

    /// Delete the data files an append wrote for commits that all failed for certain (no attempt
    /// may have landed): nothing references them. After an unknown outcome they may be
    /// committed, so they stay ([`remove_unreferenced_files`](Self::remove_unreferenced_files)
    /// takes them once old enough if they were not).
    async fn discard_files(&self, files: Option<WrittenFiles>, maybe_landed: bool) {
        if let (false, Some((_, files, _))) = (maybe_landed, files) {
            self.store.delete_files(files.iter().map(|f| f.file_path().to_string()).collect()).await;
        }
    }

    /// Add an optional (nullable) top-level column `name` of `data_type` through iceberg's
    /// schema update. Rows written before read as null. Returns the table with the new schema
    /// (this handle's columns and the new one; columns another writer added meanwhile get nulls
    /// from its appends, as from a handle opened before they were added).
    /// This handle keeps the old one and still appends, with nulls in the new column; so do
    /// batches in the old shape given to the new handle. Works with every catalog. Nested types
    /// (lists, structs, maps) are `InvalidInput` here (iceberg-rust 0.10's Arrow conversion needs
    /// field ids on nested fields); add such a column with another engine, then open the table
    /// again with the new schema.
    pub async fn add_column(&self, name: &str, data_type: arrow_schema::DataType) -> Result<ArrowTable> {
        let what = format!("adding column {name} to {}", self.ident);
        if self.user.field_with_name(name).is_ok() {
            return Err(Error::invalid(format!("{what}: the column exists")));
        }
        let ty = round_trip_type(&data_type, &what)?;
        // A commit that lands first (an append, another engine's change) makes this one a
        // conflict: reload and add the column to the new version. An unknown outcome is settled
        // by the reload too: the column is then in the table.
        let attempts = self.store.inner.settings.max_commit_attempts.max(1);
        let mut last_err = None;
        for attempt in 0..attempts {
            let Some(table) = self.attempt_table(attempt, &mut last_err).await? else { continue };
            if table.metadata().format_version() < iceberg::spec::FormatVersion::V3 && nanosecond_timestamps(&data_type)
            {
                return Err(v3_only(&what, name, &data_type));
            }
            if table.metadata().current_schema().field_by_name(name).is_some() {
                last_err = None;
                break;
            }
            crate::commit::refuse_v1_refs(&table, &what).await?;
            let tx = Transaction::new(&table);
            let tx = tx
                .update_schema()
                .add_column(iceberg::transaction::AddColumn::optional(name, ty.clone()))
                .apply(tx)
                .map_err(|e| classify(e, &what).with_retryable(false))?;
            match crate::error::iceberg_panic_is_corrupt(&table, tx.commit(&self.store.pinned(&table))).await {
                Ok(_) => {
                    last_err = None;
                    break;
                }
                Err(e) => last_err = Some(worth_retrying(e, &what)?),
            }
        }
        if let Some(e) = last_err {
            return Err(e);
        }
        let mut fields: Vec<arrow_schema::FieldRef> = self.user.fields().iter().cloned().collect();
        fields.push(Arc::new(arrow_schema::Field::new(name, data_type, true)));
        self.reopen(Arc::new(arrow_schema::Schema::new_with_metadata(fields, self.user.metadata().clone())), &what)
            .await
    }

    /// Widen top-level column `name` to `data_type`, as the Iceberg spec allows: `Int32` to
    /// `Int64`, `Float32` to `Float64`, `Decimal128(p, s)` to `Decimal128(p', s)` with
    /// `p' >= p`. Rows written before are read widened. Returns the table with the new schema.
    ///
    /// iceberg-rust 0.10.1 has no column update, so this commits the new schema itself and
    /// needs the SQL catalog (`InvalidInput` with another).
    pub async fn widen_column(&self, name: &str, data_type: arrow_schema::DataType) -> Result<ArrowTable> {
        let what = format!("widening column {name} of {}", self.ident);
        let new_ty = round_trip_type(&data_type, &what)?;
        // A commit that lands first (an append) makes this one a conflict: reload and widen the
        // new version. A widening this handle does not know of yet (an earlier attempt whose
        // reply was lost, another handle's) is done: the handle is reopened.
        let attempts = self.store.inner.settings.max_commit_attempts.max(1);
        let mut last_err = None;
        for attempt in 0..attempts {
            // After a backoff from the second attempt on (a pipeline appending every few
            // milliseconds made every immediate retry conflict), freshly loaded.
            let Some(table) = self.attempt_table(attempt, &mut last_err).await? else { continue };
            let md = table.metadata();
            let schema = md.current_schema();
            let field = schema
                .as_struct()
                .fields()
                .iter()
                .find(|f| f.name == name)
                .ok_or_else(|| Error::invalid(format!("{what}: no top-level column {name}")))?;
            let known = self.user.field_with_name(name).map(|f| f.data_type() == &data_type).unwrap_or(false);
            if *field.field_type == new_ty && !known {
                last_err = None;
                break;
            }
            // The spec's promotions, as `conform` casts batches by them (`data_type` is the exact
            // Arrow form of `new_ty`, checked above).
            let allowed =
                iceberg::arrow::type_to_arrow_type(&field.field_type).is_ok_and(|from| widens(&from, &data_type));
            if !allowed {
                return Err(Error::invalid(format!(
                    "{what}: {} to {new_ty} is not an allowed promotion (int->long, float->double, decimal precision)",
                    field.field_type
                )));
            }
            let fields: Vec<iceberg::spec::NestedFieldRef> = schema
                .as_struct()
                .fields()
                .iter()
                .map(|f| {
                    if f.name == name {
                        let mut g = f.as_ref().clone();
                        g.field_type = Box::new(new_ty.clone());
                        Arc::new(g)
                    } else {
                        f.clone()
                    }
                })
                .collect();
            let new_schema = iceberg::spec::Schema::builder()
                // iceberg assigns the id again; a damaged maximal id must not overflow here.
                .with_schema_id(schema.schema_id().saturating_add(1))
                .with_fields(fields)
                .with_identifier_field_ids(schema.identifier_field_ids())
                .build()
                .map_err(|e| classify(e, &what).with_retryable(false))?;
            let updates = vec![
                iceberg::TableUpdate::AddSchema { schema: new_schema },
                iceberg::TableUpdate::SetCurrentSchema { schema_id: -1 },
            ];
            let requirements = vec![
                iceberg::TableRequirement::UuidMatch { uuid: md.uuid() },
                iceberg::TableRequirement::CurrentSchemaIdMatch { current_schema_id: md.current_schema_id() },
            ];
            match self.store.commit_updates(&table, updates, requirements, &what).await {
                Ok(_) => {
                    last_err = None;
                    break;
                }
                // Lost to another commit, or a store or catalog in trouble, or an unknown outcome
                // (the reload settles it: the column is then widened): another attempt, as
                // `add_column` makes.
                Err(e) if another_attempt_may_succeed(&e) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        if let Some(e) = last_err {
            return Err(e);
        }
        let fields: Vec<arrow_schema::FieldRef> = self
            .user
            .fields()
            .iter()
            .map(|f| {
                if f.name() == name {
                    Arc::new(f.as_ref().clone().with_data_type(data_type.clone()))
                } else {
                    f.clone()
                }
            })
            .collect();
        self.reopen(Arc::new(arrow_schema::Schema::new_with_metadata(fields, self.user.metadata().clone())), &what)
            .await
    }

    /// The handle with user schema `user` after a schema change (`what`) landed: the table must
    /// hold each of its columns, of its type, nullable where it is, and the columns this handle
    /// knew under the same field ids (else `InvalidInput`, though the change landed: another
    /// engine replaced a column meanwhile). Nullable columns another writer added meanwhile may
    /// be there too (this handle's batches get nulls in them, as a handle opened before a column
    /// was added does).
    async fn reopen(&self, user: SchemaRef, what: &str) -> Result<ArrowTable> {
        let table = self.load().await?;
        let iceberg_arrow = Arc::new(
            iceberg::arrow::schema_to_arrow_schema(table.metadata().current_schema()).map_err(|e| classify(e, what))?,
        );
        // The table's columns of `user`, in its order: the handle's Iceberg shape as this
        // handle knows the table (the table's own when it has no other columns); appends give
        // batches the table's current shape from it. Each of the same type, nullable where the
        // user's column is, and (those this handle knew) the same column by field id, nested
        // fields included, also when the shape is the same; the table's other columns nullable
        // (they get nulls).
        let id = |f: &arrow_schema::Field| f.metadata().get(parquet::arrow::PARQUET_FIELD_ID_META_KEY).cloned();
        let known: Option<Vec<arrow_schema::FieldRef>> = user
            .fields()
            .iter()
            .map(|f| {
                let g = iceberg_arrow.field_with_name(f.name()).ok()?;
                let same_column = self.iceberg_arrow.field_with_name(f.name()).ok().is_none_or(|was| {
                    id(was).zip(id(g)).is_none_or(|(a, b)| a == b) && same_nested_ids(was.data_type(), g.data_type())
                });
                (same_column
                    && (g.is_nullable() || !f.is_nullable())
                    && dotdo_core::arrow_shape::same_type(f.data_type(), g.data_type()))
                .then(|| Arc::new(g.clone()))
            })
            .collect();
        let others_nullable =
            iceberg_arrow.fields().iter().all(|g| g.is_nullable() || user.field_with_name(g.name()).is_ok());
        let Some(known) = known.filter(|_| others_nullable) else {
            return Err(Error::invalid(format!(
                "{what}: the change is in the table, but this handle's columns are not as they were (the table's \
                 schema is now {iceberg_arrow:?}): open the table again"
            )));
        };
        let known = Arc::new(arrow_schema::Schema::new_with_metadata(known, iceberg_arrow.metadata().clone()));
        Ok(ArrowTable {
            store: self.store.clone(),
            ident: self.ident.clone(),
            user,
            iceberg_arrow: known,
            shape_refused: Default::default(),
        })
    }

    /// Compact the table's small files (bin-packed to [`CompactOptions::target_file_size`](crate::CompactOptions::target_file_size),
    /// rows of each file in their order though files may interleave, old files read through the
    /// current schema) into one `replace`
    /// snapshot that keeps every stream's batch marks, so exactly-once appends continue. Same
    /// protocol and catalog requirement as [`IcebergColdStore::compact`].
    pub async fn compact(&self, options: crate::CompactOptions) -> Result<crate::RewriteReport> {
        let table = self.load().await?;
        self.store.compact_user_table(table, options).await
    }

    /// Expire the table's snapshots committed more than `older_than` ago (by the store's
    /// clock), always keeping the newest `retain_last` (at least 1): the same rules as
    /// [`IcebergColdStore::expire_snapshots`], so every stream's batch marks (carried by the
    /// head) survive and exactly-once appends continue. Deletes no files: run
    /// [`remove_unreferenced_files`](Self::remove_unreferenced_files) afterwards. A table
    /// appended to once per pipeline roll gains a snapshot per roll, and every commit rewrites
    /// the table metadata that lists them all: expire regularly. A table no dotdo append ever
    /// wrote (no batch marks) keeps its whole history: expiry keeps every snapshot's chain down
    /// to the nearest one dotdo appended, as for the change table's watermarks.
    pub async fn expire_snapshots(
        &self,
        older_than: std::time::Duration,
        retain_last: usize,
    ) -> Result<crate::ExpireReport> {
        self.store.expire_snapshots_of(&self.ident, older_than, retain_last).await
    }

    /// Delete the table's files that nothing references (files a compaction replaced once the
    /// snapshots that read them are expired, files of failed commits) and that are older than
    /// `retention`: the same rules as [`IcebergColdStore::remove_unreferenced_files`],
    /// `retention` at least [`Settings::min_cleanup_retention`](crate::Settings::min_cleanup_retention)
    /// and the minimum the table records.
    pub async fn remove_unreferenced_files(&self, retention: std::time::Duration) -> Result<crate::CleanupReport> {
        self.store.remove_unreferenced_files_of(&self.ident, retention).await
    }

    /// Every row of the table at its current snapshot (for tests and small tables), in the
    /// table's current schema (columns added since a row was written read as null).
    pub async fn read_all(&self) -> Result<Vec<RecordBatch>> {
        let table = self.load().await?;
        if table.metadata().current_snapshot().is_none() {
            return Ok(Vec::new());
        }
        let what = format!("scanning {}", self.ident);
        let scan = table.scan().build().map_err(|e| classify(e, &what))?;
        let mut tasks = self.store.planned_tasks(&table, &scan, &what).await?;
        crate::compact::through_current_schema(&table, &mut tasks);
        crate::compact::read_tasks(&table, tasks, &what, &format!("a data file of {}", self.ident)).await
    }
}

// The tests open local warehouses, whose default catalog is the SQL catalog.
#[cfg(all(test, feature = "sql"))]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};

    /// Ranges are sized by the data the rows hold, not by the buffers behind them (a slice of a
    /// large batch reported the whole batch's memory and was split as if it held all of it), and
    /// they keep every row once, in order, across the input batches.
    #[test]
    fn row_ranges_count_the_rows_data_and_keep_every_row_in_order() {
        use arrow_array::{Array, Int32Array, LargeBinaryArray};
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int32, false),
            Field::new("payload", DataType::LargeBinary, false),
        ]));
        let ids: Vec<i32> = (0..200).collect();
        let payloads = LargeBinaryArray::from_iter_values(ids.iter().map(|_| vec![1u8; 256 << 10]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from(ids.clone())), Arc::new(payloads)])
            .expect("batch");
        // 20 rows hold 5 MiB: one range, though their buffers hold 50 MiB.
        assert_eq!(super::row_ranges(&[batch.slice(0, 20)]).len(), 1);
        // All 50 MiB: three ranges of 16 MiB or more, at most one per core.
        let ranges = super::row_ranges(&[batch.slice(0, 120), batch.slice(120, 80)]);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        assert_eq!(ranges.len(), cores.min(3));
        let back: Vec<i32> = ranges
            .iter()
            .flatten()
            .flat_map(|b| {
                let id = b.column(0).as_any().downcast_ref::<Int32Array>().expect("ids").clone();
                (0..id.len()).map(move |r| id.value(r))
            })
            .collect();
        assert_eq!(back, ids, "every row once, in order");
    }

    /// The snapshot that set a stream's mark is the answer only while the table has it: once it
    /// is expired, a later snapshot carrying the mark on (another stream's append) is not taken
    /// for it (a lost-reply append would have reported that snapshot as its own).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_marking_snapshot_is_never_one_that_only_carries_the_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = crate::Settings { min_cleanup_retention: Duration::ZERO, ..Default::default() };
        let cold = crate::IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .settings(settings)
            .build()
            .await
            .expect("open");
        let (t, batch) = events_table(&cold).await;
        let s1 = t.append("s", 1, vec![batch(1)]).await.expect("s 1").snapshot.expect("a snapshot");
        let s2 = t.append("t", 1, vec![batch(2)]).await.expect("t 1").snapshot.expect("a snapshot");
        let table = t.load().await.expect("load");
        assert_eq!(super::snapshot_marking(&table, "s", 1), Some(s1));
        assert_eq!(super::snapshot_marking(&table, "t", 1), Some(s2));
        dotdo_core::Clock::sleep(&dotdo_core::SystemClock::new(), Duration::from_millis(5)).await;
        t.expire_snapshots(Duration::ZERO, 1).await.expect("expire");
        let table = t.load().await.expect("load");
        assert!(table.metadata().snapshot_by_id(s1).is_none(), "s1 expired");
        assert_eq!(super::snapshot_marking(&table, "s", 1), None, "s2 only carries s's mark");
        assert_eq!(super::snapshot_marking(&table, "t", 1), None, "s2's parent is gone: not known");
        assert_eq!(t.last_batch("s").await.expect("mark"), 1, "the mark itself stays");
    }

    /// The same with another engine's snapshot between the one that set the mark and a later
    /// dotdo append that carries it on, once another engine expired only the first: the later
    /// one is not taken for it (its parent, holding no marks, looked like the mark's start).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_foreign_snapshot_between_does_not_hide_an_expired_marking_snapshot() {
        use iceberg::transaction::{ApplyTransactionAction, Transaction};
        let dir = tempfile::tempdir().expect("tempdir");
        let cold = crate::IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("open");
        let (t, batch) = events_table(&cold).await;
        let s1 = t.append("s", 1, vec![batch(1)]).await.expect("s 1").snapshot.expect("a snapshot");
        // Another engine appends (no dotdo properties).
        let table = t.load().await.expect("load");
        let relabelled = RecordBatch::try_new(t.iceberg_arrow.clone(), vec![Arc::new(Int64Array::from(vec![2]))])
            .expect("batch in the table's schema");
        let files =
            super::write_user_files(&cold, &table, &[relabelled], 1 << 20, true, "foreign").await.expect("files");
        let tx = Transaction::new(&table);
        let tx = tx.fast_append().add_data_files(files).apply(tx).expect("apply");
        let table = tx.commit(&*cold.catalog()).await.expect("foreign commit");
        let foreign = table.metadata().current_snapshot_id().expect("head");
        assert!(!crate::summary::is_dotdo(table.metadata().current_snapshot().expect("head")));
        let s3 = t.append("t", 1, vec![batch(3)]).await.expect("t 1").snapshot.expect("a snapshot");
        let table = t.load().await.expect("load");
        assert_eq!(super::snapshot_marking(&table, "s", 1), Some(s1), "walked past the foreign snapshot");
        assert_eq!(super::snapshot_marking(&table, "t", 1), Some(s3));
        // Another engine expires s1 alone.
        let removal = vec![iceberg::TableUpdate::RemoveSnapshots { snapshot_ids: vec![s1] }];
        let table = cold.commit_updates(&table, removal, vec![], "expiring s1").await.expect("expire s1");
        assert!(table.metadata().snapshot_by_id(foreign).is_some());
        assert_eq!(super::snapshot_marking(&table, "s", 1), None, "{s3} only carries s's mark");
    }

    /// A table another engine created partitioned, then made unpartitioned by dropping its
    /// partition field (a new spec, id 1, without fields), takes appends: its files are filed
    /// under spec 1. (They carried spec id 0, which iceberg's own append, used on the memory
    /// and REST catalogs and for v1/v3 tables, refused; the append failed as `Corrupt` every
    /// time.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unpartitioned_spec_of_another_id_takes_appends() {
        use std::collections::HashMap;

        use iceberg::spec::{NestedField, PrimitiveType, Transform, Type, UnboundPartitionSpec};
        use iceberg::TableCreation;
        let dir = tempfile::tempdir().expect("tempdir");
        let cold = crate::IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("open");
        let catalog = cold.catalog();
        let ns = iceberg::NamespaceIdent::new("u".into());
        if !catalog.namespace_exists(&ns).await.expect("namespace") {
            catalog.create_namespace(&ns, HashMap::new()).await.expect("namespace");
        }
        let schema = iceberg::spec::Schema::builder()
            .with_fields(vec![NestedField::required(1, "n", Type::Primitive(PrimitiveType::Long)).into()])
            .build()
            .expect("schema");
        let partitioned =
            UnboundPartitionSpec::builder().add_partition_field(1, "n", Transform::Identity).expect("field").build();
        // Format v3: appended through iceberg's own fast append, which checks the spec id
        // (dotdo's, used for v2 tables on the SQL catalog, files them under the default spec).
        let creation = TableCreation::builder()
            .name("re".into())
            .schema(schema)
            .partition_spec(partitioned)
            .format_version(iceberg::spec::FormatVersion::V3)
            .build();
        let table = catalog.create_table(&ns, creation).await.expect("created partitioned");
        let unpartitioned = UnboundPartitionSpec::builder().build();
        let drop_field = vec![
            iceberg::TableUpdate::AddSpec { spec: unpartitioned },
            iceberg::TableUpdate::SetDefaultSpec { spec_id: -1 },
        ];
        let table =
            cold.commit_updates(&table, drop_field, vec![], "dropping the partition field").await.expect("spec");
        let spec_id = table.metadata().default_partition_spec_id();
        assert_ne!(spec_id, 0, "the unpartitioned spec is a new one");
        let user = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let t = cold.arrow_table(&["u"], "re", user.clone()).await.expect("opened");
        let b = RecordBatch::try_new(user, vec![Arc::new(Int64Array::from(vec![1, 2, 3]))]).expect("batch");
        let done = t.append("s", 1, vec![b]).await.expect("appended");
        assert_eq!(done.rows, 3);
        let rows: usize = t.read_all().await.expect("read").iter().map(RecordBatch::num_rows).sum();
        assert_eq!(rows, 3);
        let table = t.load().await.expect("load");
        let head = table.metadata().current_snapshot().expect("head");
        let list = table.manifest_list_reader(head).load().await.expect("manifest list");
        let specs: Vec<i32> = list.entries().iter().map(|m| m.partition_spec_id).collect();
        assert!(!specs.is_empty() && specs.iter().all(|s| *s == spec_id), "manifests of specs {specs:?}");
    }

    /// A large batch rolls into files of about the target size (the rolling writer starts a
    /// new file only between batches; the batch was written whole, one file of 8 MiB with a
    /// 1 MiB target), and row groups keep to `row_group_rows` (parquet's default was 1 Mi).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_batch_rolls_into_files_of_the_target_size_and_row_groups_are_capped() {
        use arrow_array::{Array, LargeBinaryArray};
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = crate::Settings { target_file_size: 1 << 20, row_group_rows: 1000, ..Default::default() };
        let cold = crate::IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .settings(settings)
            .build()
            .await
            .expect("open");
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("payload", DataType::LargeBinary, false),
        ]));
        let t = cold.arrow_table(&["u"], "wide", schema.clone()).await.expect("table");
        // 64 rows of 128 KiB that do not compress: 8 MiB.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let payloads = LargeBinaryArray::from_iter_values((0..64).map(|_| {
            (0..128 << 10)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect::<Vec<u8>>()
        }));
        let wide = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from_iter_values(0..64)) as Arc<dyn Array>, Arc::new(payloads)],
        )
        .expect("batch");
        t.append("s", 1, vec![wide.clone()]).await.expect("wide append");
        let table = t.load().await.expect("load");
        let files = cold.live_files(&table).await.expect("files");
        assert!(files.len() >= 4, "{} files of 8 MiB with a 1 MiB target", files.len());
        for f in &files {
            assert!(f.size <= 3 << 20, "a file of {} bytes with a 1 MiB target", f.size);
        }
        // 5,000 narrow rows in one batch: row groups of at most 1,000 rows.
        let narrow = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let t = cold.arrow_table(&["u"], "narrow", narrow.clone()).await.expect("table");
        let b = RecordBatch::try_new(narrow, vec![Arc::new(Int64Array::from_iter_values(0..5000))]).expect("batch");
        t.append("s", 1, vec![b]).await.expect("narrow append");
        let table = t.load().await.expect("load");
        let files = cold.live_files(&table).await.expect("files");
        assert_eq!(files.len(), 1);
        let groups: Vec<i64> = row_groups(&files[0].path).iter().map(|g| g.num_rows()).collect();
        assert_eq!(groups.iter().sum::<i64>(), 5000);
        assert!(groups.len() >= 5 && groups.iter().all(|n| *n <= 1000), "row groups {groups:?}");
        // The wide batch again, under the default target, with row groups of 256 KiB: groups of
        // about that many bytes (a group's first write went in whole: one group of 8 MiB).
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = crate::Settings { row_group_bytes: 256 << 10, ..Default::default() };
        let cold = crate::IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .settings(settings)
            .build()
            .await
            .expect("open");
        let t = cold.arrow_table(&["u"], "wide", schema.clone()).await.expect("table");
        t.append("s", 1, vec![wide]).await.expect("wide append");
        let table = t.load().await.expect("load");
        let files = cold.live_files(&table).await.expect("files");
        assert_eq!(files.len(), 1);
        let sizes: Vec<i64> = row_groups(&files[0].path).iter().map(|g| g.total_byte_size()).collect();
        assert!(sizes.len() >= 16 && sizes.iter().all(|b| *b <= 512 << 10), "row group bytes {sizes:?}");
    }

    /// The row groups of the local Parquet file at `location`.
    fn row_groups(location: &str) -> Vec<parquet::file::metadata::RowGroupMetaData> {
        let bytes = std::fs::read(location.strip_prefix("file://").unwrap_or(location)).expect("file");
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
            .expect("parquet");
        reader.metadata().row_groups().to_vec()
    }

    /// A user table `u.events` of one Int64 column `n` on `cold`, and a maker of one-row batches.
    async fn events_table(cold: &crate::IcebergColdStore) -> (crate::ArrowTable, impl Fn(i64) -> RecordBatch) {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let t = cold.arrow_table(&["u"], "events", schema.clone()).await.expect("table");
        let batch =
            move |n: i64| RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![n]))]).expect("b");
        (t, batch)
    }

    /// A user table whose head another engine removed after dotdo's appends: its stream marks are
    /// unknown, not unset, so a replay of batch 1 is refused (`Corrupt`), not appended again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_user_table_whose_head_was_removed_refuses_appends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cold = crate::IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("open");
        let (t, batch) = events_table(&cold).await;
        t.append("s", 1, vec![batch(1)]).await.expect("s 1");
        let table = t.load().await.expect("load");
        let reset = vec![iceberg::TableUpdate::RemoveSnapshotRef { ref_name: "main".into() }];
        cold.commit_updates(&table, reset, vec![], "removing main").await.expect("reset");
        let e = t.append("s", 1, vec![batch(1)]).await.expect_err("a replay of batch 1");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{e}");
        assert!(t.load().await.expect("load").metadata().current_snapshot().is_none(), "nothing appended");
    }

    /// A table only other engines wrote, whose oldest snapshot another engine expired, holds no
    /// stream marks: dotdo appends to it, compacts and expires it. (Its broken parent chain read
    /// as dotdo's watermarks lost: `Corrupt` on every append, for good.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_table_only_other_engines_wrote_and_expired_takes_dotdo_appends() {
        use iceberg::transaction::{ApplyTransactionAction, Transaction};
        let dir = tempfile::tempdir().expect("tempdir");
        let cold = crate::IcebergColdStore::builder(dir.path().to_str().expect("utf-8")).build().await.expect("open");
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let t = cold.arrow_table(&["u"], "foreign", schema.clone()).await.expect("table");
        let mut first = None;
        for n in [1i64, 2] {
            let table = t.load().await.expect("load");
            let rows = RecordBatch::try_new(t.iceberg_arrow.clone(), vec![Arc::new(Int64Array::from(vec![n]))])
                .expect("batch in the table's schema");
            let files = super::write_user_files(&cold, &table, &[rows], 1 << 20, true, "foreign").await.expect("files");
            let tx = Transaction::new(&table);
            let tx = tx.fast_append().add_data_files(files).apply(tx).expect("apply");
            let table = tx.commit(&*cold.catalog()).await.expect("another engine's append");
            first.get_or_insert(table.metadata().current_snapshot_id().expect("head"));
        }
        let table = t.load().await.expect("load");
        let removal = vec![iceberg::TableUpdate::RemoveSnapshots { snapshot_ids: vec![first.expect("first")] }];
        cold.commit_updates(&table, removal, vec![], "another engine's expiry").await.expect("expire");
        let t = cold.arrow_table(&["u"], "foreign", schema.clone()).await.expect("opened again");
        assert_eq!(t.last_batch("s").await.expect("no marks"), 0);
        let batch =
            |n: i64| RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![n]))]).expect("b");
        assert_eq!(t.append("s", 1, vec![batch(3)]).await.expect("dotdo appends").rows, 1);
        assert_eq!(t.append("s", 1, vec![batch(3)]).await.expect("a replay").rows, 0);
        assert_eq!(t.append("s", 2, vec![batch(4)]).await.expect("dotdo appends").rows, 1);
        assert_eq!(t.last_batch("s").await.expect("mark"), 2);
        let report = t.compact(crate::CompactOptions::default()).await.expect("compact");
        assert!(report.files_removed >= 2, "{report:?}");
        t.expire_snapshots(Duration::ZERO, 1).await.expect("expire");
        assert_eq!(t.last_batch("s").await.expect("mark survives"), 2);
        let rows: usize = t.read_all().await.expect("read").iter().map(RecordBatch::num_rows).sum();
        assert_eq!(rows, 4, "two foreign rows and two of dotdo's, once each");
    }
}

#[cfg(test)]
mod statistics_tests {
    use std::sync::Arc;

    use arrow_array::builder::{ListBuilder, MapBuilder, StringBuilder};
    use arrow_array::{ArrayRef, RecordBatch, StringArray, StructArray};
    use arrow_schema::{DataType, Field};

    use super::{long_value_columns, MAX_STATISTICS_VALUE_BYTES};

    /// Nested leaves are found by their Parquet paths: a long value in a struct field or a map
    /// value turns that leaf's statistics off, short leaves keep theirs.
    #[test]
    fn long_values_are_found_in_nested_columns() {
        let long = "x".repeat(MAX_STATISTICS_VALUE_BYTES + 1);
        let fits = "y".repeat(MAX_STATISTICS_VALUE_BYTES);
        let st = StructArray::from(vec![
            (
                Arc::new(Field::new("a", DataType::Utf8, false)),
                Arc::new(StringArray::from(vec![fits.as_str()])) as ArrayRef,
            ),
            (
                Arc::new(Field::new("b", DataType::Utf8, false)),
                Arc::new(StringArray::from(vec![long.as_str()])) as ArrayRef,
            ),
        ]);
        let mut list = ListBuilder::new(StringBuilder::new());
        list.values().append_value(&long);
        list.append(true);
        let mut map = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        map.keys().append_value("k");
        map.values().append_value(&long);
        map.append(true).expect("map");
        let top = StringArray::from(vec![fits.as_str()]);
        let b = RecordBatch::try_from_iter(vec![
            ("top", Arc::new(top) as ArrayRef),
            ("st", Arc::new(st) as ArrayRef),
            ("l", Arc::new(list.finish()) as ArrayRef),
            ("m", Arc::new(map.finish()) as ArrayRef),
        ])
        .expect("batch");
        let paths: Vec<String> = long_value_columns(&[b]).iter().map(|p| p.string()).collect();
        assert_eq!(paths, ["st.b", "l.list.item", "m.entries.values"]);
        assert!(long_value_columns(&[]).is_empty());
    }
}
