//! The bytes Arrow data holds (feature `arrow`): what dotdo-pipelines counts against its
//! capacity and roll thresholds and dotdo-iceberg splits parallel writes by.

use arrow_data::ArrayData;

/// The bytes the rows of `d` hold: arrow's `get_slice_memory_size` (a slice of a larger array
/// counts its own rows only; a buffer grown by doubling counts what it holds, not its
/// capacity), except where that would index an empty offsets buffer (an empty string, binary or
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
    match offsets_present(d).then(|| d.get_slice_memory_size()) {
        Some(Ok(n)) => n,
        _ => buffer_bytes(d),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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
}
