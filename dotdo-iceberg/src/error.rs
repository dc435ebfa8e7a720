//! The one place where iceberg, object_store, parquet, arrow and sqlx errors become
//! [`dotdo_core::Error`]s.
//!
//! Rules (each has a unit test below):
//!
//! * an unreachable or failing store, a busy or unreachable catalog database, a timeout →
//!   `Unavailable`, retryable;
//! * a missing or undecodable data / metadata / manifest file → `Corrupt`, naming the file;
//!   an I/O or decoding error *below* a failed store or catalog connection (a peer closing
//!   early reads as an unexpected EOF) is the connection breaking, so also `Unavailable`; a REST
//!   catalog's 429 or 5xx answer → `Unavailable`;
//! * a REST commit whose state the server says is unknown → `AmbiguousOutcome` (read back);
//! * an iceberg commit conflict → `Conflict`, retryable;
//! * a missing table or namespace → `NotFound`;
//! * bad configuration (unknown option, bad URL) → `InvalidInput`;
//! * anything else → `Backend`.
//!
//! Classification walks the whole `source()` chain, because iceberg wraps the object-store or
//! parquet error that actually happened.

use std::error::Error as StdError;

use dotdo_core::{Error, ErrorKind};

/// What failed, as found in an error's source chain (most specific cause first).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The object store reported a missing object.
    Missing(String),
    /// The store or network failed (transient).
    StoreUnavailable,
    /// The store rejected the credentials or the request.
    StoreDenied,
    /// The store or catalog was misconfigured.
    Config,
    /// A file could not be decoded (parquet, avro, JSON, arrow).
    Undecodable,
    /// The catalog database is busy, locked or unreachable.
    CatalogUnavailable,
    /// iceberg reported a commit conflict.
    CommitConflict,
    /// iceberg reported a missing table or namespace.
    TableMissing,
    /// iceberg reported invalid data (bad metadata).
    DataInvalid,
    /// A REST catalog said the commit's outcome is unknown (HTTP 500, 502, 504 on commit).
    OutcomeUnknown,
    /// Nothing more specific is known.
    Other,
}

/// Classify an `object_store` error.
pub(crate) fn object_store_cause(e: &object_store::Error) -> Cause {
    use object_store::Error as E;
    match e {
        E::NotFound { path, .. } => Cause::Missing(path.clone()),
        E::Generic { .. } | E::JoinError { .. } => Cause::StoreUnavailable,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => Cause::StoreDenied,
        E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } | E::NotSupported { .. } | E::NotImplemented => {
            Cause::Config
        }
        E::AlreadyExists { .. } | E::Precondition { .. } | E::NotModified { .. } => Cause::Other,
        _ => Cause::StoreUnavailable,
    }
}

fn io_cause(e: &std::io::Error) -> Cause {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound => Cause::Missing(String::new()),
        K::InvalidData | K::UnexpectedEof => Cause::Undecodable,
        K::PermissionDenied => Cause::StoreDenied,
        _ => Cause::StoreUnavailable,
    }
}

fn sqlx_cause(e: &sqlx::Error) -> Cause {
    use sqlx::Error as E;
    match e {
        E::Io(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Tls(_) | E::Protocol(_) => {
            Cause::CatalogUnavailable
        }
        E::Database(db) => {
            // SQLITE_BUSY (5) / SQLITE_LOCKED (6), including extended codes.
            let busy = db.code().and_then(|c| c.parse::<i32>().ok()).is_some_and(|c| matches!(c & 0xff, 5 | 6));
            if busy {
                Cause::CatalogUnavailable
            } else {
                Cause::Other
            }
        }
        E::Configuration(_) | E::InvalidArgument(_) => Cause::Config,
        E::RowNotFound => Cause::TableMissing,
        E::ColumnDecode { .. } | E::Decode(_) | E::TypeNotFound { .. } | E::ColumnNotFound(_) => Cause::Undecodable,
        _ => Cause::Other,
    }
}

fn iceberg_cause(e: &iceberg::Error) -> Cause {
    use iceberg::ErrorKind as K;
    if e.kind() == K::Unexpected {
        // iceberg-catalog-rest: a commit answered 500/502/504, or any request answered with a
        // status it does not map (429 and 5xx are the server's or a proxy's trouble, and
        // transient).
        if e.message().contains("commit state is unknown") {
            return Cause::OutcomeUnknown;
        }
        if e.message() == "Received response with unexpected status code" {
            let shown = e.to_string();
            if shown.contains("status: 429") || shown.contains("status: 5") {
                return Cause::StoreUnavailable;
            }
        }
    }
    match e.kind() {
        K::CatalogCommitConflicts => Cause::CommitConflict,
        K::TableNotFound | K::NamespaceNotFound => Cause::TableMissing,
        K::DataInvalid => Cause::DataInvalid,
        K::PreconditionFailed
        | K::Unexpected
        | K::NamespaceAlreadyExists
        | K::TableAlreadyExists
        | K::FeatureUnsupported => Cause::Other,
        _ => Cause::Other,
    }
}

/// The most specific cause in the chain of `e`.
pub(crate) fn cause_of(e: &(dyn StdError + 'static)) -> Cause {
    let mut best = Cause::Other;
    // Below a failed transport (an object-store or catalog-database error other than "not
    // found"), an I/O or decoding error is how the connection broke (a peer closing early is an
    // `UnexpectedEof`), not damage in a file: the data never arrived.
    let mut in_transport = false;
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        let c = if let Some(os) = err.downcast_ref::<object_store::Error>() {
            let c = object_store_cause(os);
            in_transport |= c == Cause::StoreUnavailable;
            c
        } else if in_transport {
            Cause::Other
        } else if let Some(io) = err.downcast_ref::<std::io::Error>() {
            io_cause(io)
        } else if let Some(sq) = err.downcast_ref::<sqlx::Error>() {
            let c = sqlx_cause(sq);
            in_transport |= c == Cause::CatalogUnavailable;
            c
        } else if err.downcast_ref::<parquet::errors::ParquetError>().is_some()
            || err.downcast_ref::<arrow_schema::ArrowError>().is_some()
            || err.downcast_ref::<serde_json::Error>().is_some()
        {
            Cause::Undecodable
        } else if let Some(ib) = err.downcast_ref::<iceberg::Error>() {
            iceberg_cause(ib)
        } else if let Some(d) = err.downcast_ref::<Error>() {
            // dotdo's own errors raised inside an iceberg call (the SQL catalog pointer swap).
            match d.kind() {
                ErrorKind::Unavailable => Cause::CatalogUnavailable,
                ErrorKind::AmbiguousOutcome => Cause::OutcomeUnknown,
                ErrorKind::Conflict => Cause::CommitConflict,
                _ => Cause::Other,
            }
        } else {
            Cause::Other
        };
        // A deeper, more specific cause wins over a generic wrapper.
        if c != Cause::Other {
            best = c;
        }
        cur = err.source();
    }
    best
}

/// Map a cause to a dotdo error. `what` names the file or operation for the message.
pub(crate) fn to_error(cause: Cause, what: &str, message: String) -> Error {
    match cause {
        Cause::Missing(path) => {
            let file = if path.is_empty() { what.to_string() } else { path };
            Error::corrupt(format!("{what}: file {file} is missing: {message}"))
        }
        Cause::StoreUnavailable => Error::unavailable(format!("{what}: store unavailable: {message}")),
        Cause::CatalogUnavailable => Error::unavailable(format!("{what}: catalog unavailable: {message}")),
        Cause::StoreDenied => {
            Error::new(ErrorKind::Backend, format!("{what}: access denied: {message}")).with_retryable(false)
        }
        Cause::Config => Error::invalid(format!("{what}: configuration: {message}")),
        Cause::Undecodable | Cause::DataInvalid => Error::corrupt(format!("{what}: cannot decode: {message}")),
        Cause::CommitConflict => Error::new(ErrorKind::Conflict, format!("{what}: commit conflict: {message}")),
        Cause::TableMissing => Error::new(ErrorKind::NotFound, format!("{what}: {message}")),
        Cause::OutcomeUnknown => Error::new(ErrorKind::AmbiguousOutcome, format!("{what}: {message}")),
        Cause::Other => Error::backend(format!("{what}: {message}")),
    }
}

/// Classify an iceberg error raised while doing `what` (which should name the file or table).
pub(crate) fn classify(e: iceberg::Error, what: &str) -> Error {
    let cause = cause_of(&e);
    let msg = e.to_string();
    to_error(cause, what, msg).with_source(e)
}

/// Classify an object-store error.
pub(crate) fn classify_object_store(e: object_store::Error) -> Error {
    let cause = object_store_cause(&e);
    let what = match &e {
        object_store::Error::NotFound { path, .. } => path.clone(),
        _ => "object store".to_string(),
    };
    let msg = e.to_string();
    to_error(cause, &what, msg).with_source(e)
}

/// Classify a parquet error raised while reading or writing `file`.
pub(crate) fn classify_parquet(e: parquet::errors::ParquetError, file: &str) -> Error {
    let cause = match cause_of(&e) {
        Cause::Other => Cause::Undecodable,
        c => c,
    };
    let msg = e.to_string();
    to_error(cause, &format!("data file {file}"), msg).with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os_generic() -> object_store::Error {
        object_store::Error::Generic { store: "S3", source: Box::new(std::io::Error::other("connection refused")) }
    }

    fn wrapped(e: object_store::Error) -> iceberg::Error {
        iceberg::Error::new(iceberg::ErrorKind::Unexpected, "io").with_source(e)
    }

    #[test]
    fn unreachable_store_is_retryable_unavailable() {
        let e = classify(wrapped(os_generic()), "table t");
        assert_eq!(e.kind(), &ErrorKind::Unavailable);
        assert!(e.is_retryable());
    }

    #[test]
    fn a_connection_dropped_mid_read_is_unavailable_not_corrupt() {
        // object_store's own chain for "peer closed the connection": Generic > ... > io EOF.
        let eof = object_store::Error::Generic {
            store: "S3",
            source: Box::new(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "peer closed connection")),
        };
        let e = classify(wrapped(eof), "manifest s3://b/wh/t/metadata/m.avro");
        assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
        // The same EOF reading a local file that ends early is damage.
        let local = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "read")
            .with_source(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short file"));
        assert_eq!(classify(local, "file f").kind(), &ErrorKind::Corrupt);
    }

    #[test]
    fn rest_catalog_statuses() {
        let status = |code: &str| {
            iceberg::Error::new(iceberg::ErrorKind::Unexpected, "Received response with unexpected status code")
                .with_context("status", code.to_string())
        };
        for busy in ["429 Too Many Requests", "503 Service Unavailable"] {
            let e = classify(status(busy), "catalog");
            assert_eq!(e.kind(), &ErrorKind::Unavailable, "{busy}: {e}");
            assert!(e.is_retryable());
        }
        assert_eq!(classify(status("400 Bad Request"), "catalog").kind(), &ErrorKind::Backend);
        let unknown = iceberg::Error::new(
            iceberg::ErrorKind::Unexpected,
            "An unknown server-side problem occurred; the commit state is unknown.",
        );
        assert_eq!(classify(unknown, "commit").kind(), &ErrorKind::AmbiguousOutcome);
    }

    #[test]
    fn missing_file_is_corrupt_and_names_the_file() {
        let nf = object_store::Error::NotFound {
            path: "wh/t/data/x.parquet".into(),
            source: Box::new(std::io::Error::from(std::io::ErrorKind::NotFound)),
        };
        let e = classify(wrapped(nf), "data file s3://b/wh/t/data/x.parquet");
        assert_eq!(e.kind(), &ErrorKind::Corrupt);
        assert!(e.message().contains("wh/t/data/x.parquet"), "{e}");
        assert!(!e.is_retryable());
    }

    #[test]
    fn undecodable_files_are_corrupt() {
        let pq = parquet::errors::ParquetError::General("bad footer".into());
        let e = classify_parquet(pq, "x.parquet");
        assert_eq!(e.kind(), &ErrorKind::Corrupt);
        assert!(e.message().contains("x.parquet"));
        let json = serde_json::from_str::<serde_json::Value>("{").expect_err("bad json");
        let ib = iceberg::Error::new(iceberg::ErrorKind::DataInvalid, "bad metadata").with_source(json);
        assert_eq!(classify(ib, "metadata m.json").kind(), &ErrorKind::Corrupt);
        let arrow = arrow_schema::ArrowError::InvalidArgumentError("x".into());
        let ib = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "decode").with_source(arrow);
        assert_eq!(classify(ib, "data file f").kind(), &ErrorKind::Corrupt);
    }

    #[test]
    fn parquet_error_wrapping_a_store_failure_is_unavailable() {
        let pq = parquet::errors::ParquetError::External(Box::new(wrapped(os_generic())));
        assert_eq!(classify_parquet(pq, "x.parquet").kind(), &ErrorKind::Unavailable);
    }

    #[test]
    fn commit_conflicts_and_missing_tables() {
        let c = iceberg::Error::new(iceberg::ErrorKind::CatalogCommitConflicts, "cas failed").with_retryable(true);
        let e = classify(c, "commit");
        assert_eq!(e.kind(), &ErrorKind::Conflict);
        assert!(e.is_retryable());
        let nf = iceberg::Error::new(iceberg::ErrorKind::TableNotFound, "no table");
        assert_eq!(classify(nf, "load").kind(), &ErrorKind::NotFound);
        let ns = iceberg::Error::new(iceberg::ErrorKind::NamespaceNotFound, "no ns");
        assert_eq!(classify(ns, "load").kind(), &ErrorKind::NotFound);
    }

    #[test]
    fn catalog_database_failures_are_unavailable() {
        let ib = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "sql").with_source(sqlx::Error::PoolTimedOut);
        let e = classify(ib, "catalog");
        assert_eq!(e.kind(), &ErrorKind::Unavailable);
        assert!(e.is_retryable());
    }

    #[test]
    fn configuration_and_permission_errors_are_not_retryable() {
        let e = classify_object_store(object_store::Error::UnknownConfigurationKey { store: "S3", key: "x".into() });
        assert_eq!(e.kind(), &ErrorKind::InvalidInput);
        let e = classify_object_store(object_store::Error::PermissionDenied {
            path: "p".into(),
            source: Box::new(std::io::Error::other("denied")),
        });
        assert_eq!(e.kind(), &ErrorKind::Backend);
        assert!(!e.is_retryable());
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let ib = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "io").with_source(io);
        assert_eq!(classify(ib, "x").kind(), &ErrorKind::Unavailable);
    }

    #[test]
    fn unknown_iceberg_errors_are_backend() {
        let e = classify(iceberg::Error::new(iceberg::ErrorKind::FeatureUnsupported, "nope"), "commit");
        assert_eq!(e.kind(), &ErrorKind::Backend);
    }
}
