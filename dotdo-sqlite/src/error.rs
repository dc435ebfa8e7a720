//! Classification of SQLite failures into [`dotdo_core::Error`] kinds, in one exhaustive place.

use dotdo_core::{Error, ErrorKind};
use rusqlite::ErrorCode;

/// What a SQLite failure means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Locked by another connection or process; retry later.
    Busy,
    /// Damaged database or not a database at all.
    Corrupt,
    /// Disk full, read-only, cannot open, I/O error: the environment is broken, maybe transiently.
    Environment,
    /// A value exceeded SQLite's size limit.
    TooBig,
    /// Anything else: a bug or unexpected state.
    Other,
}

pub(crate) fn class_of_code(code: ErrorCode) -> Class {
    match code {
        // SQLITE_PROTOCOL: a WAL reader lost its race for a read lock about 100 times in a row
        // under heavy multi-process contention; a transient lock race like busy.
        ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::FileLockingProtocolFailed => Class::Busy,
        ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => Class::Corrupt,
        ErrorCode::DiskFull
        | ErrorCode::ReadOnly
        | ErrorCode::CannotOpen
        | ErrorCode::SystemIoFailure
        | ErrorCode::PermissionDenied
        | ErrorCode::NoLargeFileSupport
        | ErrorCode::OutOfMemory => Class::Environment,
        ErrorCode::TooBig => Class::TooBig,
        ErrorCode::InternalMalfunction
        | ErrorCode::OperationAborted
        | ErrorCode::OperationInterrupted
        | ErrorCode::NotFound
        | ErrorCode::SchemaChanged
        | ErrorCode::ConstraintViolation
        | ErrorCode::TypeMismatch
        | ErrorCode::ApiMisuse
        | ErrorCode::ParameterOutOfRange
        | ErrorCode::Unknown => Class::Other,
        _ => Class::Other,
    }
}

// SQLITE_IOERR_CORRUPTFS: the file system reported damage under the database (an I/O error by
// its primary code, damage by what it says: not retried). SQLITE_IOERR_GETTEMPPATH: SQLite
// found no directory for a temporary file (the host's setup: not retried).
pub(crate) use rusqlite::ffi::{SQLITE_IOERR_CORRUPTFS, SQLITE_IOERR_GETTEMPPATH};

pub(crate) fn class_of(e: &rusqlite::Error) -> Class {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.extended_code == SQLITE_IOERR_CORRUPTFS => Class::Corrupt,
        rusqlite::Error::SqliteFailure(f, _) => class_of_code(f.code),
        // A stored value that does not fit the schema (text where a number belongs, a negative
        // sequence number, an invalid node id): the file was written by something else.
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => Class::Corrupt,
        _ => Class::Other,
    }
}

/// Map a rusqlite error, with what we were doing, to the public error.
pub(crate) fn map(e: rusqlite::Error, doing: &str) -> Error {
    let class = class_of(&e);
    let err = match class {
        Class::Busy => Error::unavailable(format!("{doing}: database is busy (locked by another connection)")),
        Class::Corrupt => match &e {
            rusqlite::Error::SqliteFailure(..) => {
                Error::corrupt(format!("{doing}: the file is not a healthy SQLite database"))
            }
            other => Error::corrupt(format!("{doing}: a stored row does not match dotdo's schema: {other}")),
        },
        Class::Environment => {
            let (retryable, why) = match &e {
                // No directory for temporary files (a statement journal or sort spilling to
                // disk): the host's setup, not mended by a retry.
                rusqlite::Error::SqliteFailure(f, _) if f.extended_code == SQLITE_IOERR_GETTEMPPATH => (false, ""),
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == ErrorCode::DiskFull || f.code == ErrorCode::SystemIoFailure =>
                {
                    (true, "")
                }
                // `CANTOPEN` does not say why: out of file descriptors (another reader
                // connection, a write's temporary file), the moment's, is retryable; a bad path
                // or a file made unreadable is not.
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == ErrorCode::CannotOpen && dotdo_core::sql_schema::out_of_file_descriptors() =>
                {
                    (true, " (out of file descriptors?)")
                }
                _ => (false, ""),
            };
            Error::new(ErrorKind::Unavailable, format!("{doing}: storage environment failure{why}: {e}"))
                .with_retryable(retryable)
        }
        Class::TooBig => {
            Error::new(ErrorKind::LimitExceeded { what: "sqlite value", limit: 0, actual: 0 }, doing.to_string())
        }
        Class::Other => Error::backend(format!("{doing}: sqlite failure: {e}")),
    };
    err.with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    #[test]
    fn file_system_damage_is_corrupt() {
        let e = map(failure(SQLITE_IOERR_CORRUPTFS), "reading");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        assert!(!e.is_retryable());
        let e = map(failure(rusqlite::ffi::SQLITE_IOERR_READ), "reading");
        assert_eq!(e.kind(), &ErrorKind::Unavailable, "other I/O errors stay transient: {e}");
        assert!(e.is_retryable());
    }

    #[test]
    fn busy_is_unavailable_and_retryable() {
        for code in [rusqlite::ffi::SQLITE_BUSY, rusqlite::ffi::SQLITE_LOCKED, rusqlite::ffi::SQLITE_PROTOCOL] {
            let e = map(failure(code), "write");
            assert_eq!(e.kind(), &ErrorKind::Unavailable);
            assert!(e.is_retryable());
        }
    }

    #[test]
    fn corruption_and_not_a_database_are_corrupt() {
        for code in [rusqlite::ffi::SQLITE_CORRUPT, rusqlite::ffi::SQLITE_NOTADB] {
            let e = map(failure(code), "open");
            assert_eq!(e.kind(), &ErrorKind::Corrupt);
            assert!(!e.is_retryable());
        }
    }

    #[test]
    fn environment_failures_are_unavailable() {
        let e = map(failure(rusqlite::ffi::SQLITE_FULL), "write");
        assert_eq!(e.kind(), &ErrorKind::Unavailable);
        assert!(e.is_retryable());
        let e = map(failure(rusqlite::ffi::SQLITE_READONLY), "write");
        assert_eq!(e.kind(), &ErrorKind::Unavailable);
        assert!(!e.is_retryable());
        let e = map(failure(rusqlite::ffi::SQLITE_CANTOPEN), "open");
        assert_eq!(e.kind(), &ErrorKind::Unavailable);
        assert!(!e.is_retryable(), "a path that cannot be opened, descriptors to spare: {e}");
        let e = map(failure(SQLITE_IOERR_GETTEMPPATH), "write");
        assert_eq!(e.kind(), &ErrorKind::Unavailable);
        assert!(!e.is_retryable(), "no temporary directory is no passing failure: {e}");
    }

    #[test]
    fn other_failures_are_backend_errors() {
        assert_eq!(map(failure(rusqlite::ffi::SQLITE_CONSTRAINT), "x").kind(), &ErrorKind::Backend);
        assert_eq!(map(rusqlite::Error::QueryReturnedNoRows, "x").kind(), &ErrorKind::Backend);
        assert!(matches!(map(failure(rusqlite::ffi::SQLITE_TOOBIG), "x").kind(), ErrorKind::LimitExceeded { .. }));
    }
}
