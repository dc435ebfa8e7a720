//! The database schema: [`dotdo_core::sql_schema`], shared with dotdo-sqlite (a file written by
//! one backend is read by the other).

/// Schema version stored in `PRAGMA user_version`.
pub(crate) const VERSION: i64 = dotdo_core::sql_schema::SQL_HOT_SCHEMA_VERSION;

/// The statements creating the schema.
pub(crate) const CREATE: &str = dotdo_core::sql_schema::SQL_HOT_SCHEMA;
