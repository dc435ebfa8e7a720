//! Whether two Arrow schemas describe the same columns (feature `arrow`): what dotdo-pipelines
//! and dotdo-iceberg check before they accept a batch as a table's.

use arrow_schema::{DataType, Field, Fields, Schema};

/// Whether `a` and `b` are the same type for a table's data: arrow's `equals_datatype` (nested
/// field metadata ignored, nullability compared), except that the fields of a struct must also
/// have the same names in the same order. arrow compares struct fields by position and type only,
/// so a `Struct<lat: f64, lon: f64>` would equal a `Struct<lon: f64, lat: f64>` and its values
/// would be written into each other's columns. The names of a list's item field and of a map's
/// entries (`item`/`element`, `entries`/`key_value`, `keys`/`key`) are ignored: writers name
/// them differently and a value has no other way to reach them.
///
/// ```
/// use arrow_schema::{DataType, Field, Fields};
/// use dotdo_core::arrow_shape::same_type;
/// let point = |a: &str, b: &str| {
///     DataType::Struct(Fields::from(vec![Field::new(a, DataType::Float64, false), Field::new(b, DataType::Float64, false)]))
/// };
/// assert!(same_type(&point("lat", "lon"), &point("lat", "lon")));
/// assert!(!same_type(&point("lat", "lon"), &point("lon", "lat")));
/// let list = |item: &str| DataType::List(Field::new(item, DataType::Int64, true).into());
/// assert!(same_type(&list("item"), &list("element")));
/// ```
pub fn same_type(a: &DataType, b: &DataType) -> bool {
    use DataType as T;
    match (a, b) {
        (T::List(x), T::List(y))
        | (T::LargeList(x), T::LargeList(y))
        | (T::ListView(x), T::ListView(y))
        | (T::LargeListView(x), T::LargeListView(y)) => same_field(x, y, false),
        (T::FixedSizeList(x, n), T::FixedSizeList(y, m)) => n == m && same_field(x, y, false),
        (T::Map(x, xs), T::Map(y, ys)) => {
            // The entries struct's own field names (key/value) vary by writer: compared by position.
            xs == ys
                && x.is_nullable() == y.is_nullable()
                && match (x.data_type(), y.data_type()) {
                    (T::Struct(f), T::Struct(g)) => same_fields(f, g, false),
                    (p, q) => same_type(p, q),
                }
        }
        (T::Struct(f), T::Struct(g)) => same_fields(f, g, true),
        (T::Dictionary(xk, xv), T::Dictionary(yk, yv)) => same_type(xk, yk) && same_type(xv, yv),
        (T::RunEndEncoded(xr, xv), T::RunEndEncoded(yr, yv)) => same_field(xr, yr, false) && same_field(xv, yv, false),
        (T::Union(f, fm), T::Union(g, gm)) => {
            fm == gm
                && f.len() == g.len()
                && f.iter().all(|(id, p)| g.iter().any(|(jd, q)| id == jd && same_field(p, q, true)))
        }
        _ => a.equals_datatype(b),
    }
}

/// Whether `a` and `b` have the same columns in the same order: names, nullability and
/// [`same_type`] (schema and field metadata ignored).
pub fn same_shape(a: &Schema, b: &Schema) -> bool {
    same_fields(a.fields(), b.fields(), true)
}

/// Whether two fields have the same nullability and [`same_type`], and the same name if
/// `by_name`.
fn same_field(p: &Field, q: &Field, by_name: bool) -> bool {
    (!by_name || p.name() == q.name()) && p.is_nullable() == q.is_nullable() && same_type(p.data_type(), q.data_type())
}

/// [`same_field`] pairwise over two field lists of the same length.
fn same_fields(f: &Fields, g: &Fields, by_name: bool) -> bool {
    f.len() == g.len() && f.iter().zip(g).all(|(p, q)| same_field(p, q, by_name))
}

/// The most microseconds a `Time64(Microsecond)` value may hold: Iceberg's `time` is a time of
/// day, `0..=MAX_TIME_MICROS` (iceberg-rust refuses any other value when it gathers a data
/// file's statistics).
pub const MAX_TIME_MICROS: i64 = 86_400_000_000 - 1;

/// The most bytes one string or binary value (`Utf8`, `LargeUtf8`, `Utf8View`, `Binary`,
/// `LargeBinary`, `BinaryView`) may hold, `i32::MAX - 4`: a Parquet
/// page's size is a signed 32-bit number, and a value is stored in one with a 4-byte length
/// prefix (parquet-rs failed a longer one's write with a generic error after the batch was
/// accepted: a pipeline's log then held a batch no roll could commit).
pub const MAX_ARROW_VALUE_BYTES: i64 = i32::MAX as i64 - 4;

/// `InvalidInput` (naming the column and row) if a value of `batch`, nested ones included, is
/// one an Iceberg table cannot hold although arrow builds it without a check (`LimitExceeded`
/// for a string or binary value over [`MAX_ARROW_VALUE_BYTES`]):
/// * a decimal with more digits than its type's precision: the Parquet writer stores a decimal
///   in the width its precision gives, so a value beyond it was written cut to that width
///   (4294967297 in a `decimal(5,2)` column read back as 0.01) or out of its declared range;
/// * a `Time64(Microsecond)` outside a day, `0..=`[`MAX_TIME_MICROS`] (PostgreSQL's
///   `24:00:00`, a negative time): the data file was written, then iceberg refused its
///   statistics, so every commit of the batch failed after uploading a file.
///
/// Null slots are not checked, nor values under a null struct slot (arrow allows anything
/// there), list and map items included; the items of lists and maps are checked whatever their
/// own list's slot. A dictionary-encoded column is checked at the dictionary values its rows
/// use. Run-end-encoded and list-view columns are not looked into.
///
/// ```
/// use std::sync::Arc;
/// use arrow_array::{Decimal128Array, RecordBatch, Time64MicrosecondArray};
/// let column = |v: i128| Decimal128Array::from(vec![v]).with_precision_and_scale(5, 2).expect("type");
/// let ok = RecordBatch::try_from_iter([("d", Arc::new(column(99_999)) as _)]).expect("batch");
/// assert!(dotdo_core::arrow_shape::check_values(&ok).is_ok());
/// let wide = RecordBatch::try_from_iter([("d", Arc::new(column(100_000)) as _)]).expect("batch");
/// assert!(dotdo_core::arrow_shape::check_values(&wide).is_err());
/// let midnight = Arc::new(Time64MicrosecondArray::from(vec![86_400_000_000]));
/// let late = RecordBatch::try_from_iter([("t", midnight as _)]).expect("batch");
/// assert!(dotdo_core::arrow_shape::check_values(&late).is_err());
/// ```
pub fn check_values(batch: &arrow_array::RecordBatch) -> crate::Result<()> {
    batch
        .schema()
        .fields()
        .iter()
        .zip(batch.columns())
        .try_for_each(|(f, c)| check_values_where(c.as_ref(), f.name(), &|_| true))
}

/// The earlier name of [`check_values`], which checked decimals only.
#[deprecated(note = "renamed `check_values` (it checks times of day too)")]
pub fn check_decimals(batch: &arrow_array::RecordBatch) -> crate::Result<()> {
    check_values(batch)
}

/// [`check_values`] for one column named `name`, at the slots `shown` says a reader sees (a
/// struct's child values under its null slots are not: arrow allows anything there).
fn check_values_where(column: &dyn arrow_array::Array, name: &str, shown: &dyn Fn(usize) -> bool) -> crate::Result<()> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Decimal128Type, DecimalType};
    use arrow_array::Array;
    use arrow_schema::DataType as T;
    // Items `from..to` of a list's child, at the slots `seen` says a reader sees.
    let items = |values: &arrow_array::ArrayRef, from: usize, to: usize, inner: &str, seen: &dyn Fn(usize) -> bool| {
        if from >= to || to > values.len() {
            return Ok(());
        }
        check_values_where(values.slice(from, to - from).as_ref(), inner, seen)
    };
    // The first and last offset of a list's rows (its items' range in the child).
    fn range<O: arrow_array::OffsetSizeTrait>(o: &[O]) -> (usize, usize) {
        let at = |v: Option<&O>| v.and_then(|v| v.to_usize()).unwrap_or(0);
        (at(o.first()), at(o.last()))
    }
    // The row of a list whose items hold child slot `item` (offsets ascend; of several rows
    // starting there, the empty ones come first).
    fn row_of<O: arrow_array::OffsetSizeTrait>(o: &[O], item: usize) -> usize {
        o.partition_point(|v| v.to_usize().is_some_and(|v| v <= item)).saturating_sub(1)
    }
    match column.data_type() {
        T::Decimal128(precision, _) => {
            let a = column.as_primitive::<Decimal128Type>();
            match (0..a.len()).find(|&i| {
                a.is_valid(i) && shown(i) && !Decimal128Type::is_valid_decimal_precision(a.value(i), *precision)
            }) {
                None => Ok(()),
                Some(i) => Err(crate::Error::invalid(format!(
                    "column {name}: row {i} holds {}, more digits than its precision {precision} allows",
                    a.value(i)
                ))),
            }
        }
        T::Time64(arrow_schema::TimeUnit::Microsecond) => {
            let a = column.as_primitive::<arrow_array::types::Time64MicrosecondType>();
            match (0..a.len()).find(|&i| a.is_valid(i) && shown(i) && !(0..=MAX_TIME_MICROS).contains(&a.value(i))) {
                None => Ok(()),
                Some(i) => Err(crate::Error::invalid(format!(
                    "column {name}: row {i} holds the time {} µs, outside a day (0..={MAX_TIME_MICROS} µs, \
                     the range of Iceberg's time type)",
                    a.value(i)
                ))),
            }
        }
        // `Utf8` and `Binary` too: their 32-bit offsets allow values of up to 2^31 - 1 bytes,
        // past the limit (a user table's strings are `Utf8`; such a value failed the Parquet
        // write as a backend error, and a durable pipeline held a batch no roll could commit).
        T::LargeBinary | T::LargeUtf8 | T::Binary | T::Utf8 => {
            // The first value (index, length) a reader sees that is over the limit.
            fn too_long<O: arrow_array::OffsetSizeTrait>(
                column: &dyn Array,
                offsets: &[O],
                shown: &dyn Fn(usize) -> bool,
            ) -> Option<(usize, i64)> {
                // No value is longer than all of them together: the usual case needs no pass.
                let span =
                    offsets.first().zip(offsets.last()).map_or(0, |(a, b)| b.as_usize().saturating_sub(a.as_usize()));
                if span as i64 <= MAX_ARROW_VALUE_BYTES {
                    return None;
                }
                let len = |i: usize| match (offsets.get(i), offsets.get(i + 1)) {
                    (Some(a), Some(b)) => b.as_usize().saturating_sub(a.as_usize()) as i64,
                    _ => 0,
                };
                (0..column.len())
                    .find(|&i| column.is_valid(i) && shown(i) && len(i) > MAX_ARROW_VALUE_BYTES)
                    .map(|i| (i, len(i)))
            }
            let found = match column.data_type() {
                T::LargeBinary => too_long(column, column.as_binary::<i64>().value_offsets(), shown),
                T::LargeUtf8 => too_long(column, column.as_string::<i64>().value_offsets(), shown),
                T::Binary => too_long(column, column.as_binary::<i32>().value_offsets(), shown),
                _ => too_long(column, column.as_string::<i32>().value_offsets(), shown),
            };
            match found {
                None => Ok(()),
                Some((i, len)) => Err(crate::Error::limit(
                    "bytes in one Arrow string or binary value",
                    MAX_ARROW_VALUE_BYTES as u64,
                    len as u64,
                )
                .context(format!("column {name}: row {i}"))),
            }
        }
        // Views hold 32-bit lengths: up to 4 GiB - 1 bytes a value, also past the limit.
        T::Utf8View | T::BinaryView => {
            let lengths: Vec<u32> = match column.data_type() {
                T::Utf8View => column.as_string_view().lengths().collect(),
                _ => column.as_binary_view().lengths().collect(),
            };
            match (0..column.len())
                .find(|&i| column.is_valid(i) && shown(i) && i64::from(lengths[i]) > MAX_ARROW_VALUE_BYTES)
            {
                None => Ok(()),
                Some(i) => Err(crate::Error::limit(
                    "bytes in one Arrow string or binary value",
                    MAX_ARROW_VALUE_BYTES as u64,
                    u64::from(lengths[i]),
                )
                .context(format!("column {name}: row {i}"))),
            }
        }
        T::Struct(_) => {
            let s = column.as_struct();
            let nulls = s.nulls();
            let here = |i: usize| shown(i) && nulls.is_none_or(|n| n.is_valid(i));
            s.fields()
                .iter()
                .zip(s.columns())
                .try_for_each(|(f, c)| check_values_where(c.as_ref(), &format!("{name}.{}", f.name()), &here))
        }
        T::List(_) => {
            let l = column.as_list::<i32>();
            let (o, (from, to)) = (l.value_offsets(), range(l.value_offsets()));
            items(l.values(), from, to, &format!("{name}[]"), &|k| shown(row_of(o, from + k)))
        }
        T::LargeList(_) => {
            let l = column.as_list::<i64>();
            let (o, (from, to)) = (l.value_offsets(), range(l.value_offsets()));
            items(l.values(), from, to, &format!("{name}[]"), &|k| shown(row_of(o, from + k)))
        }
        T::FixedSizeList(_, n) => {
            let l = column.as_fixed_size_list();
            let n = usize::try_from(*n).unwrap_or(0);
            let nulls = l.nulls();
            let here = |j: usize| n > 0 && shown(j / n) && nulls.is_none_or(|x| x.is_valid(j / n));
            // The list's values as its rows see them (a sliced list keeps its whole child).
            items(l.values(), l.offset() * n, (l.offset() + l.len()) * n, &format!("{name}[]"), &here)
        }
        T::Map(..) => {
            let m = column.as_map();
            let (o, (from, to)) = (m.value_offsets(), range(m.value_offsets()));
            let entries: arrow_array::ArrayRef = std::sync::Arc::new(m.entries().clone());
            items(&entries, from, to, name, &|k| shown(row_of(o, from + k)))
        }
        // A dictionary's values at the keys of the rows a reader sees (a dictionary may hold
        // values no row uses). Dictionary-encoded decimals passed unchecked.
        T::Dictionary(..) => {
            let Some(d) = column.as_any_dictionary_opt() else { return Ok(()) };
            if d.values().is_empty() {
                // No value for a row to use (every row null, or none at all; arrow's
                // `normalized_keys` asserts a non-empty dictionary).
                return Ok(());
            }
            let keys = d.normalized_keys();
            let used: std::collections::HashSet<usize> = (0..column.len())
                .filter(|&i| column.is_valid(i) && shown(i))
                .filter_map(|i| keys.get(i).copied())
                .collect();
            check_values_where(d.values().as_ref(), name, &|k| used.contains(&k))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_schema::{Field, Fields};

    /// A `LargeBinary` value over `MAX_ARROW_VALUE_BYTES` (a Parquet page's size is an `i32`) is
    /// `LimitExceeded` naming the column and row; one of exactly the limit passes, and so does a
    /// long value under a null slot. (The 2 GiB buffer is zeroed memory the check never
    /// touches: it reads the offsets only.)
    #[test]
    fn arrow_values_too_long_for_parquet_are_refused() {
        use arrow_array::{LargeBinaryArray, RecordBatch};
        use arrow_buffer::{Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};
        use std::sync::Arc;
        let max = MAX_ARROW_VALUE_BYTES;
        let values = Buffer::from_vec(vec![0u8; max as usize + 1]);
        let column = |end: i64, nulls: Option<NullBuffer>| {
            let offsets = OffsetBuffer::new(ScalarBuffer::from(vec![0i64, 0, end]));
            let a = LargeBinaryArray::try_new(offsets, values.clone(), nulls).expect("array");
            RecordBatch::try_from_iter([("blob", Arc::new(a) as _)]).expect("batch")
        };
        check_values(&column(max, None)).expect("exactly the limit");
        let e = check_values(&column(max + 1, None)).expect_err("one byte more");
        assert!(matches!(e.kind(), crate::ErrorKind::LimitExceeded { .. }), "{e}");
        assert!(e.to_string().contains("column blob: row 1"), "{e}");
        check_values(&column(max + 1, Some(NullBuffer::from(vec![true, false])))).expect("under a null slot");
        // `Binary` (32-bit offsets, as `Utf8`): its largest values are past the limit too.
        let binary = |end: i32| {
            let offsets = OffsetBuffer::new(ScalarBuffer::from(vec![0i32, 0, end]));
            let a = arrow_array::BinaryArray::try_new(offsets, values.clone(), None).expect("array");
            RecordBatch::try_from_iter([("blob", Arc::new(a) as _)]).expect("batch")
        };
        check_values(&binary(max as i32)).expect("exactly the limit");
        let e = check_values(&binary(max as i32 + 1)).expect_err("one byte more");
        assert!(matches!(e.kind(), crate::ErrorKind::LimitExceeded { .. }), "{e}");
        assert!(e.to_string().contains("column blob: row 1"), "{e}");
        // `BinaryView` (32-bit lengths in its views, up to 4 GiB - 1): the same limit. The view
        // of a value of `len` zero bytes at the start of the one data buffer.
        let view = |len: u32| -> arrow_array::BinaryViewArray {
            let long = arrow_data::ByteView::new(len, &[0; 4]).with_buffer_index(0).with_offset(0);
            let views = ScalarBuffer::from(vec![0u128, long.as_u128()]);
            arrow_array::BinaryViewArray::try_new(views, vec![values.clone()], None).expect("array")
        };
        let batch = |a: arrow_array::BinaryViewArray| RecordBatch::try_from_iter([("blob", Arc::new(a) as _)]);
        check_values(&batch(view(max as u32)).expect("batch")).expect("exactly the limit");
        let e = check_values(&batch(view(max as u32 + 1)).expect("batch")).expect_err("one byte more");
        assert!(matches!(e.kind(), crate::ErrorKind::LimitExceeded { .. }), "{e}");
        assert!(e.to_string().contains("column blob: row 1"), "{e}");
    }

    /// Times of day outside a day are refused where a reader sees them (`InvalidInput` naming
    /// the row), not under a null slot or a null struct slot; the day's first and last
    /// microsecond pass.
    #[test]
    fn times_outside_a_day_are_refused_where_seen() {
        use arrow_array::{ArrayRef, RecordBatch, StructArray, Time64MicrosecondArray};
        use std::sync::Arc;
        let times = |v: Vec<Option<i64>>| -> ArrayRef { Arc::new(Time64MicrosecondArray::from(v)) };
        let batch = |c: ArrayRef| RecordBatch::try_from_iter([("t", c)]).expect("batch");
        check_values(&batch(times(vec![Some(0), Some(MAX_TIME_MICROS), None]))).expect("a day's range");
        let e = check_values(&batch(times(vec![Some(1), Some(MAX_TIME_MICROS + 1)]))).expect_err("24:00:00");
        assert!(e.to_string().contains("column t: row 1"), "{e}");
        assert!(check_values(&batch(times(vec![Some(-1)]))).is_err(), "a negative time");
        let field = Field::new("t", arrow_schema::DataType::Time64(arrow_schema::TimeUnit::Microsecond), true);
        let fields = Fields::from(vec![field]);
        let under_null = StructArray::new(fields.clone(), vec![times(vec![Some(-5)])], Some(vec![false].into()));
        check_values(&batch(Arc::new(under_null))).expect("the bad time is under a null struct slot");
        let seen = StructArray::new(fields, vec![times(vec![Some(-5)])], None);
        assert!(check_values(&batch(Arc::new(seen))).is_err(), "a bad struct field a reader sees");
    }

    /// Dictionary-encoded decimals are checked at the values the rows use (they passed
    /// unchecked, and a sink could cut them to the declared width); a value no row uses is not
    /// held against the batch.
    #[test]
    fn dictionary_encoded_decimals_are_checked_where_used() {
        use arrow_array::{Array, ArrayRef, Decimal128Array, DictionaryArray, Int32Array, RecordBatch};
        use std::sync::Arc;
        let values = Decimal128Array::from(vec![100, 10_000_000]).with_precision_and_scale(5, 2).expect("decimals");
        let dict = |keys: Vec<i32>| -> RecordBatch {
            let d = DictionaryArray::try_new(Int32Array::from(keys), Arc::new(values.clone())).expect("dictionary");
            let f = Field::new("price", d.data_type().clone(), true);
            RecordBatch::try_new(Arc::new(Schema::new(vec![f])), vec![Arc::new(d) as ArrayRef]).expect("batch")
        };
        let e = check_values(&dict(vec![0, 1])).expect_err("10000000 has 8 digits, precision 5");
        assert!(e.to_string().contains("price"), "{e}");
        check_values(&dict(vec![0, 0])).expect("the oversized value is in the dictionary, used by no row");
    }

    /// A dictionary column with an empty dictionary (every row null, or no rows at all) passes:
    /// it panicked (arrow's `normalized_keys` asserts a non-empty dictionary).
    #[test]
    fn an_empty_dictionary_passes_without_a_panic() {
        use arrow_array::types::Int32Type;
        use arrow_array::{Array, ArrayRef, DictionaryArray, RecordBatch};
        use std::sync::Arc;
        let d: DictionaryArray<Int32Type> = vec![None::<&str>, None].into_iter().collect();
        assert!(d.values().is_empty());
        let all_null = RecordBatch::try_from_iter([("c", Arc::new(d) as ArrayRef)]).expect("batch");
        check_values(&all_null).expect("every row null");
        check_values(&RecordBatch::new_empty(all_null.schema())).expect("no rows");
    }

    fn point(a: &str, b: &str) -> DataType {
        DataType::Struct(Fields::from(vec![
            Field::new(a, DataType::Float64, false),
            Field::new(b, DataType::Float64, true),
        ]))
    }

    #[test]
    fn struct_fields_match_by_name_nested_too() {
        assert!(same_type(&point("lat", "lon"), &point("lat", "lon")));
        assert!(!same_type(&point("lat", "lon"), &point("lon", "lat")));
        assert!(!same_type(&point("lat", "lon"), &point("lat", "lng")));
        let listed = |t: DataType| DataType::List(Field::new("item", t, true).into());
        assert!(!same_type(&listed(point("lat", "lon")), &listed(point("lon", "lat"))));
        let schema = |t: DataType| Schema::new(vec![Field::new("loc", t, true)]);
        assert!(same_shape(&schema(point("lat", "lon")), &schema(point("lat", "lon"))));
        assert!(!same_shape(&schema(point("lat", "lon")), &schema(point("lon", "lat"))));
    }

    #[test]
    fn list_item_and_map_entry_names_are_ignored() {
        let list = |item: &str| DataType::List(Field::new(item, DataType::Utf8, true).into());
        assert!(same_type(&list("item"), &list("element")));
        let map = |entries: &str, k: &str, v: &str| {
            DataType::Map(
                Field::new(
                    entries,
                    DataType::Struct(Fields::from(vec![
                        Field::new(k, DataType::Utf8, false),
                        Field::new(v, point("lat", "lon"), true),
                    ])),
                    false,
                )
                .into(),
                false,
            )
        };
        assert!(same_type(&map("entries", "keys", "values"), &map("key_value", "key", "value")));
        // A struct inside a map's value is still matched by name.
        let swapped = DataType::Map(
            Field::new(
                "entries",
                DataType::Struct(Fields::from(vec![
                    Field::new("keys", DataType::Utf8, false),
                    Field::new("values", point("lon", "lat"), true),
                ])),
                false,
            )
            .into(),
            false,
        );
        assert!(!same_type(&map("entries", "keys", "values"), &swapped));
        // Nullability and types still count.
        assert!(!same_type(&list("item"), &DataType::List(Field::new("item", DataType::Utf8, false).into())));
        assert!(!same_type(&list("item"), &DataType::List(Field::new("item", DataType::Binary, true).into())));
    }

    /// Decimals are checked where a reader sees them: a struct's child under a null struct slot
    /// may hold anything (arrow allows it), a fixed-size list's items are checked like a list's.
    #[test]
    fn decimals_are_checked_where_readers_see_them() {
        use arrow_array::{Array, ArrayRef, Decimal128Array, FixedSizeListArray, RecordBatch, StructArray};
        use std::sync::Arc;
        let dec = |v: Vec<i128>| -> ArrayRef {
            Arc::new(Decimal128Array::from(v).with_precision_and_scale(5, 2).expect("type"))
        };
        let fields = Fields::from(vec![Field::new("d", DataType::Decimal128(5, 2), true)]);
        let nulls = arrow_buffer::NullBuffer::from(vec![true, false]);
        let hidden = StructArray::new(fields.clone(), vec![dec(vec![1, 10_000_000])], Some(nulls));
        let batch = |a: ArrayRef| RecordBatch::try_from_iter([("c", a)]).expect("batch");
        check_values(&batch(Arc::new(hidden))).expect("the wide value is under a null slot");
        let shown = StructArray::new(fields, vec![dec(vec![1, 10_000_000])], None);
        let e = check_values(&batch(Arc::new(shown))).expect_err("a wide value a reader sees");
        assert!(e.to_string().contains("c.d") && e.to_string().contains("row 1"), "{e}");
        let item = Arc::new(Field::new("item", DataType::Decimal128(5, 2), true));
        let fixed = FixedSizeListArray::new(item, 2, dec(vec![1, 2, 3, 10_000_000]), None);
        assert!(check_values(&batch(Arc::new(fixed.clone()))).is_err(), "a fixed-size list's item");
        check_values(&batch(Arc::new(fixed.slice(0, 1)))).expect("the wide item is not in the slice");
        assert_eq!(fixed.slice(1, 1).len(), 1);
        assert!(check_values(&batch(Arc::new(fixed.slice(1, 1)))).is_err());
        // A list's items under a null struct slot are not seen either; those of the rows shown
        // are (row 2's list holds the wide item; row 1 is empty, starting where row 2 does).
        let list_item = Arc::new(Field::new("item", DataType::Decimal128(5, 2), true));
        let lists = |offsets: Vec<i32>, values: Vec<i128>| -> ArrayRef {
            Arc::new(arrow_array::ListArray::new(
                list_item.clone(),
                arrow_buffer::OffsetBuffer::new(offsets.into()),
                dec(values),
                None,
            ))
        };
        let in_struct = |l: ArrayRef, struct_nulls: Vec<bool>| -> ArrayRef {
            let f = Fields::from(vec![Field::new("l", l.data_type().clone(), true)]);
            Arc::new(StructArray::new(f, vec![l], Some(arrow_buffer::NullBuffer::from(struct_nulls))))
        };
        let under_null = in_struct(lists(vec![0, 1, 1, 2], vec![1, 10_000_000]), vec![true, true, false]);
        check_values(&batch(under_null)).expect("the wide item's struct slot is null");
        let seen = in_struct(lists(vec![0, 1, 1, 2], vec![1, 10_000_000]), vec![true, true, true]);
        let e = check_values(&batch(seen)).expect_err("a wide item a reader sees");
        assert!(e.to_string().contains("c.l[]"), "{e}");
        let first_hidden = in_struct(lists(vec![0, 1, 1, 2], vec![10_000_000, 1]), vec![false, true, true]);
        check_values(&batch(first_hidden)).expect("the wide item is row 0's, under a null slot");
    }
}
