//! Tests only: the object runtime on a libSQL hot store and an Iceberg cold store in one
//! binary, with dotdo-iceberg built without its SQL catalog (feature `sql` off), so that the
//! binary links one SQLite, libSQL's. See `tests/runtime.rs`.
