//! The one public error type of dotdo.
//!
//! Every fallible call in every dotdo crate returns [`Error`]. Callers decide what to do from its
//! [`ErrorKind`] (and [`Error::is_retryable`]), never from the message text. Backends classify
//! their own failures at the point where they happen and map them to a kind (see
//! `docs/errors.md`).

use std::fmt;

use crate::ids::{FencingToken, NodeId, ObjectId};
use crate::time::Timestamp;

/// A boxed error source, kept for diagnostics.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias used throughout dotdo.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, coarsely enough that a caller can act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The presented fencing token is lower than the highest the storage has seen for this
    /// object: another holder took over. The write was **not** applied. Stop writing; do not retry
    /// with the same token.
    Fenced {
        /// The object whose write was rejected.
        object: ObjectId,
        /// The token the caller presented.
        presented: FencingToken,
        /// The highest token the storage knows for this object.
        current: FencingToken,
    },
    /// The lease is held by another holder until `expires_at`. Retry after that time, or route
    /// the call to `holder`.
    LeaseHeld {
        /// The object whose lease is held.
        object: ObjectId,
        /// Who holds it.
        holder: NodeId,
        /// When the current lease expires unless renewed.
        expires_at: Timestamp,
    },
    /// The caller's lease is no longer valid (expired or released; a lease superseded by a
    /// newer token is [`Fenced`](ErrorKind::Fenced)). Re-acquire.
    LeaseLost {
        /// The object whose lease was lost.
        object: ObjectId,
    },
    /// An argument is invalid (bad id, bad key, malformed batch). Fix the input; retrying the same
    /// call will fail again.
    InvalidInput,
    /// A size or count limit was exceeded (for example a value over 2 MiB).
    LimitExceeded {
        /// What was too large.
        what: &'static str,
        /// The limit.
        limit: u64,
        /// The size presented.
        actual: u64,
    },
    /// A concurrent change conflicted with this one (optimistic concurrency), or state is not
    /// ready. Usually re-read and retry: retry only if [`Error::is_retryable`] (some conflicts no
    /// retry can mend; see `docs/errors.md`).
    Conflict,
    /// The outcome is unknown: the operation may or may not have been applied (for example the
    /// reply of a commit was lost). Only an idempotent operation may simply be sent again (a cold
    /// append: its watermarks skip what landed); a lease acquire is settled by reading the lease
    /// back; a hot write needs a new lease first, so that a late landing is fenced (see
    /// `docs/errors.md`).
    AmbiguousOutcome,
    /// The backend is unavailable (busy database, unreachable store, timeout, full buffer).
    /// Usually retrying later may succeed: retry only if [`Error::is_retryable`] (a read-only
    /// or unopenable database is not; see `docs/errors.md`).
    Unavailable,
    /// Stored data is corrupt or not what it claims to be (bad Parquet, bad metadata, not a
    /// database). Needs operator attention.
    Corrupt,
    /// The named thing does not exist (table, snapshot). Read a snapshot that
    /// `snapshots()` still lists, or create / name the table.
    NotFound,
    /// The component is shutting down or was shut down. Do not retry on it: route the call
    /// elsewhere, or build a new one.
    Shutdown,
    /// Any other backend failure. Report it with its `source()`; retry only if
    /// [`Error::is_retryable`].
    Backend,
}

impl ErrorKind {
    /// Whether an error of this kind is worth retrying unchanged, by default.
    pub fn default_retryable(&self) -> bool {
        matches!(self, ErrorKind::Unavailable | ErrorKind::Conflict | ErrorKind::LeaseHeld { .. })
    }

    /// A short stable name for logs and metrics (`"fenced"`, `"unavailable"`, …).
    pub fn name(&self) -> &'static str {
        match self {
            ErrorKind::Fenced { .. } => "fenced",
            ErrorKind::LeaseHeld { .. } => "lease_held",
            ErrorKind::LeaseLost { .. } => "lease_lost",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::LimitExceeded { .. } => "limit_exceeded",
            ErrorKind::Conflict => "conflict",
            ErrorKind::AmbiguousOutcome => "ambiguous_outcome",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Shutdown => "shutdown",
            ErrorKind::Backend => "backend",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Fenced { object, presented, current } => {
                write!(f, "fenced: object {object} write with token {presented} rejected, current token is {current}")
            }
            ErrorKind::LeaseHeld { object, holder, expires_at } => {
                write!(f, "lease held: object {object} is held by {holder} until {expires_at}")
            }
            ErrorKind::LeaseLost { object } => write!(f, "lease lost: object {object}"),
            ErrorKind::LimitExceeded { what, limit, actual } => {
                write!(f, "limit exceeded: {what} is {actual}, limit {limit}")
            }
            other => f.write_str(other.name()),
        }
    }
}

/// The dotdo error: a kind to act on, a message with context, a retryable flag and an optional
/// source.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    retryable: bool,
    #[source]
    source: Option<BoxError>,
}

impl Error {
    /// A new error of `kind` with a context message; retryable per the kind's default.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let retryable = kind.default_retryable();
        Error { kind, message: message.into(), retryable, source: None }
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Override whether the error is retryable.
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// The kind of error.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The context message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether retrying the same call unchanged may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// True for [`ErrorKind::Fenced`].
    pub fn is_fenced(&self) -> bool {
        matches!(self.kind, ErrorKind::Fenced { .. })
    }

    /// Shorthand for an [`ErrorKind::InvalidInput`] error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    /// Shorthand for an [`ErrorKind::Unavailable`] error (retryable).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unavailable, message)
    }

    /// Shorthand for an [`ErrorKind::Corrupt`] error.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message)
    }

    /// Shorthand for an [`ErrorKind::Backend`] error.
    pub fn backend(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Backend, message)
    }

    /// Shorthand for an [`ErrorKind::Fenced`] error.
    pub fn fenced(object: &ObjectId, presented: FencingToken, current: FencingToken) -> Self {
        Error::new(
            ErrorKind::Fenced { object: object.clone(), presented, current },
            "a newer holder has taken over this object",
        )
    }

    /// Shorthand for an [`ErrorKind::LimitExceeded`] error.
    pub fn limit(what: &'static str, limit: u64, actual: u64) -> Self {
        Error::new(ErrorKind::LimitExceeded { what, limit, actual }, format!("{what} too large"))
    }

    /// Prefix the message with more context (`"context: message"`).
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_is_retryable_and_fenced_is_not() {
        assert!(Error::unavailable("busy").is_retryable());
        let obj = ObjectId::new("a").expect("valid");
        let e = Error::fenced(&obj, FencingToken::new(1), FencingToken::new(2));
        assert!(!e.is_retryable());
        assert!(e.is_fenced());
        assert!(e.to_string().contains("token 1 rejected, current token is 2"), "{e}");
    }

    #[test]
    fn context_prefixes_message_and_source_is_kept() {
        let e = Error::corrupt("bad footer").with_source(std::io::Error::other("eof")).context("file a.parquet");
        assert_eq!(e.message(), "file a.parquet: bad footer");
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(e.kind().name(), "corrupt");
    }
}
