//! The bytes Arrow data holds (feature `arrow`): what dotdo-pipelines counts against its
//! capacity and roll thresholds and dotdo-iceberg splits parallel writes by.

use arrow_data::ArrayData;

/// The bytes the rows of `d` hold: arrow's `get_slice_memory_size` (a slice of a larger array
/// counts its own rows only; a buffer grown by doubling counts what it holds, not its
/// capacity), with the child of a list, map or fixed-size list counted for the rows' items only
/// (arrow counts a sliced list's whole child: 10 rows of a 100 MiB list column counted
/// 100 MiB), except where that would index an empty offsets buffer (an empty string, binary or
/// list array with no offsets at all, which arrow accepts and whose slice size then panics, as
/// an FFI-imported array may be): there the buffers' lengths are counted instead. Never panics.
///
/// ```
/// use arrow_data::ArrayData;
/// use arrow_buffer::Buffer;
/// use arrow_schema::DataType;
/// let ints = ArrayData::builder(DataType::Int64).len(4).add_buffer(Buffer::from_vec(vec![1i64, 2, 3, 4])).build()?;
/// assert_eq!(dotdo_core::arrow_size::rows_bytes(&ints.slice(1, 2)), 16);
/// # Ok::<(), arrow_schema::ArrowError>(())
/// ```
pub fn rows_bytes(d: &ArrayData) -> usize {
    // Only the variable-width layouts (strings, binaries) index their offsets buffer.
    fn offsets_present(d: &ArrayData) -> bool {
        use arrow_schema::DataType::{Binary, LargeBinary, LargeUtf8, Utf8};
        let indexes_offsets = matches!(d.data_type(), Utf8 | Binary | LargeUtf8 | LargeBinary);
        let missing = indexes_offsets && d.buffers().first().is_none_or(|b| b.is_empty());
        !missing && d.child_data().iter().all(offsets_present)
    }
    fn buffer_bytes(d: &ArrayData) -> usize {
        let own: usize = d.buffers().iter().map(|b| b.len()).sum();
        let nulls = d.nulls().map_or(0, |n| n.buffer().len());
        own + nulls + d.child_data().iter().map(buffer_bytes).sum::<usize>()
    }
    if d.is_empty() {
        return 0;
    }
    match offsets_present(d).then(|| slice_bytes(d)).flatten() {
        Some(n) => n,
        None => buffer_bytes(d),
    }
}

/// `get_slice_memory_size` of `d` with the children of lists, maps and fixed-size lists cut to
/// the items of `d`'s rows; `None` where the offsets do not cover the rows or point past the
/// child (damaged or foreign data: the caller counts buffer lengths).
fn slice_bytes(d: &ArrayData) -> Option<usize> {
    use arrow_schema::DataType as T;
    let whole = d.get_slice_memory_size().ok()?;
    let children_whole = d.child_data().iter().map(|c| c.get_slice_memory_size().ok()).sum::<Option<usize>>()?;
    let own = whole.checked_sub(children_whole)?;
    let items = |start: usize, end: usize| -> Option<usize> {
        let child = d.child_data().first()?;
        if start > end || end > child.len() {
            return None;
        }
        if start == end {
            return Some(0);
        }
        slice_bytes(&child.slice(start, end - start))
    };
    // The offsets of the rows' first and last item, read from the bytes (no alignment assumed:
    // a foreign buffer may not be).
    let offset = |i: usize, width: usize| -> Option<usize> {
        let at = d.offset().checked_add(i)?.checked_mul(width)?;
        let b = d.buffers().first()?.as_slice().get(at..at.checked_add(width)?)?;
        match width {
            4 => usize::try_from(i32::from_ne_bytes(b.try_into().ok()?)).ok(),
            _ => usize::try_from(i64::from_ne_bytes(b.try_into().ok()?)).ok(),
        }
    };
    let children = match d.data_type() {
        T::List(_) | T::Map(..) => items(offset(0, 4)?, offset(d.len(), 4)?)?,
        T::LargeList(_) => items(offset(0, 8)?, offset(d.len(), 8)?)?,
        T::FixedSizeList(_, n) => {
            let n = usize::try_from(*n).ok()?;
            items(d.offset().checked_mul(n)?, (d.offset() + d.len()).checked_mul(n)?)?
        }
        // Arrow's slice size counts the 16-byte views only: the bytes of every value over 12
        // bytes live in the data buffers (1 KiB strings counted 16 bytes each). Each valid
        // row's long value is counted, at most the data buffers' whole size: views may share a
        // value (a `take` with repeated indices, deduplicated strings, a Parquet dictionary read
        // as views), and 600 000 rows pointing at one 1 KiB string counted 624 MB for a batch
        // of 10 MB, over any pipeline's bound for good.
        T::Utf8View | T::BinaryView => {
            let held = d.buffers().iter().skip(1).map(|b| b.len()).try_fold(0usize, usize::checked_add)?;
            let views = d.buffers().first()?.as_slice();
            let mut long = 0usize;
            for i in 0..d.len() {
                if !d.is_valid(i) {
                    continue;
                }
                let at = d.offset().checked_add(i)?.checked_mul(16)?;
                let len = u32::from_le_bytes(views.get(at..at.checked_add(4)?)?.try_into().ok()?);
                let len = usize::try_from(len).ok()?;
                if len > 12 {
                    long = long.checked_add(len)?;
                }
            }
            long.min(held)
        }
        _ => d.child_data().iter().map(slice_bytes).sum::<Option<usize>>()?,
    };
    own.checked_add(children)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    /// A long value many views share counts once (at most the data buffers' size), not once
    /// per row: 100 000 rows of one deduplicated 1 KiB string counted about 104 MB.
    #[test]
    fn shared_view_values_count_once() {
        use arrow_array::Array;
        let mut b = arrow_array::builder::StringViewBuilder::new().with_deduplicate_strings();
        let long = "x".repeat(1024);
        for _ in 0..100_000 {
            b.append_value(&long);
        }
        let a = b.finish();
        let held = a.get_buffer_memory_size();
        let n = super::rows_bytes(&a.to_data());
        assert!(n <= 2 * held, "{n} counted for {held} held");
        assert!(n >= 100_000 * 16, "the views count: {n}");
    }

    /// String and binary views count the bytes of their long values, kept in data buffers
    /// beside the views: 1 000 strings of 1 KiB counted 16 000 bytes (the views alone), so a
    /// pipeline's memory bound let 64 times its size in. A slice counts its own rows' values.
    #[test]
    fn view_arrays_count_their_long_values() {
        use arrow_array::{Array, BinaryViewArray, StringViewArray};
        let long = "x".repeat(1024);
        let strings = StringViewArray::from_iter_values(std::iter::repeat_n(long.as_str(), 1000));
        let n = super::rows_bytes(&strings.to_data());
        assert!((1000 * 1024..1000 * (1024 + 16) + 4096).contains(&n), "{n}");
        let ten = super::rows_bytes(&strings.slice(10, 10).to_data());
        assert!((10 * 1024..10 * (1024 + 16) + 64).contains(&ten), "{ten}");
        // Short values live in their views: 16 bytes a row.
        let short = StringViewArray::from_iter_values(std::iter::repeat_n("short", 100));
        assert_eq!(super::rows_bytes(&short.to_data()), 100 * 16);
        let mixed = BinaryViewArray::from_iter([Some(&b"tiny"[..]), None, Some(long.as_bytes())]);
        let m = super::rows_bytes(&mixed.to_data());
        assert!((3 * 16 + 1024..3 * 16 + 1024 + 64).contains(&m), "{m}");
    }

    use arrow_buffer::Buffer;
    use arrow_data::ArrayData;
    use arrow_schema::{DataType, Field};

    /// A list of one empty list whose (empty) string child has no offsets at all: arrow's own
    /// slice size indexes the missing offsets and panics; here it is counted.
    #[test]
    fn an_empty_child_without_offsets_is_counted_not_a_panic() {
        let child = ArrayData::builder(DataType::Utf8)
            .len(0)
            .add_buffer(Buffer::from_vec(Vec::<i32>::new()))
            .add_buffer(Buffer::from_vec(Vec::<u8>::new()))
            .build()
            .expect("an empty string array without offsets");
        assert_eq!(super::rows_bytes(&child), 0);
        let item = Arc::new(Field::new("item", DataType::Utf8, true));
        let list = ArrayData::builder(DataType::List(item))
            .len(1)
            .add_buffer(Buffer::from_slice_ref([0i32, 0]))
            .add_child_data(child)
            .build()
            .expect("a list of one empty list");
        assert!(super::rows_bytes(&list) <= 64, "{}", super::rows_bytes(&list));
        let strings = ArrayData::builder(DataType::Utf8)
            .len(2)
            .add_buffer(Buffer::from_slice_ref([0i32, 3, 5]))
            .add_buffer(Buffer::from_vec(b"abcde".to_vec()))
            .build()
            .expect("two strings");
        assert_eq!(super::rows_bytes(&strings.slice(1, 1)), 4 + 2, "the slice's offset and bytes");
        // Empty lists over an empty string child that has its offset: arrow's own slice size.
        let child = ArrayData::builder(DataType::Utf8)
            .len(0)
            .add_buffer(Buffer::from_slice_ref([0i32]))
            .add_buffer(Buffer::from_vec(Vec::<u8>::new()))
            .build()
            .expect("an empty string array");
        let item = Arc::new(Field::new("item", DataType::Utf8, true));
        let lists = ArrayData::builder(DataType::List(item))
            .len(4)
            .add_buffer(Buffer::from_slice_ref([0i32, 0, 0, 0, 0]))
            .add_child_data(child)
            .build()
            .expect("four empty lists");
        let two = lists.slice(1, 2);
        assert_eq!(super::rows_bytes(&two), two.get_slice_memory_size().expect("size"));
    }

    /// A slice of a list column counts its own rows' items: arrow counts a sliced list's whole
    /// child (two rows of 1,000 lists of 1 KiB strings counted 1 MB).
    #[test]
    fn a_sliced_list_counts_its_own_items() {
        let n = 1000usize;
        let offsets: Vec<i32> = (0..=n as i32).map(|i| i * 1024).collect();
        let strings = ArrayData::builder(DataType::Utf8)
            .len(n)
            .add_buffer(Buffer::from_vec(offsets))
            .add_buffer(Buffer::from_vec(vec![b'x'; n * 1024]))
            .build()
            .expect("strings");
        let item = Arc::new(Field::new("item", DataType::Utf8, true));
        let list_offsets: Vec<i32> = (0..=n as i32).collect();
        let lists = ArrayData::builder(DataType::List(item.clone()))
            .len(n)
            .add_buffer(Buffer::from_vec(list_offsets))
            .add_child_data(strings.clone())
            .build()
            .expect("lists of one string");
        let whole = super::rows_bytes(&lists);
        assert!(whole > n * 1024, "{whole}");
        let two = super::rows_bytes(&lists.slice(500, 2));
        assert_eq!(two, 2 * 4 + (2 * 4 + 2 * 1024), "two offsets, and two strings with theirs");
        // Large lists and fixed-size lists alike.
        let large = ArrayData::builder(DataType::LargeList(item.clone()))
            .len(n)
            .add_buffer(Buffer::from_vec((0..=n as i64).collect::<Vec<i64>>()))
            .add_child_data(strings.clone())
            .build()
            .expect("large lists");
        assert_eq!(super::rows_bytes(&large.slice(10, 2)), 2 * 8 + (2 * 4 + 2 * 1024));
        let fixed = ArrayData::builder(DataType::FixedSizeList(item, 1))
            .len(n)
            .add_child_data(strings)
            .build()
            .expect("fixed-size lists");
        assert_eq!(super::rows_bytes(&fixed.slice(10, 2)), 2 * 4 + 2 * 1024);
    }
}
