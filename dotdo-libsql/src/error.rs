//! Classification of libsql failures into [`dotdo_core::Error`] kinds, in one exhaustive place.
//!
//! Local failures carry SQLite result codes ([`libsql::Error::SqliteFailure`]). Remote failures
//! (Hrana over HTTP) reach us as `libsql::Error::Hrana(Box<_>)` whose concrete type is private to
//! the libsql crate, so the only information available is its `Display` text (`http error: …`,
//! `api error: status=401 …`, `stream error: Error { message: …, code: "SQLITE_BUSY" }`). That
//! text is parsed here, and only here, into a [`Class`]; everything else decides on the class.

use dotdo_core::{Error, ErrorKind};

/// What a libsql failure means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Locked by another connection or process; retry later.
    Busy,
    /// Damaged database or not a database at all.
    Corrupt,
    /// Disk full, read-only, cannot open, I/O error: the environment is broken, maybe transiently.
    Environment {
        /// Whether a retry may help (disk full, I/O error) or not (read-only, permissions).
        retryable: bool,
    },
    /// A value exceeded SQLite's size limit.
    TooBig,
    /// The primary could not be reached or the exchange broke off.
    Network {
        /// Whether the request may have reached the server (and so may have been applied).
        maybe_sent: bool,
    },
    /// The server refused the credentials (HTTP 401 / 403).
    Auth,
    /// The server answered with a transient failure: 408 or 429 (refused before processing), or a
    /// 5xx (the server or a gateway failed, maybe after applying the request: a proxy answers 503
    /// also when the connection to the primary broke off after forwarding it).
    ServerUnavailable {
        /// Whether the request may have been applied.
        maybe_applied: bool,
    },
    /// A local `COMMIT` failed with an I/O error (a failed WAL write or fsync): the transaction's
    /// frames may be in the WAL already, and recovery after a crash applies them.
    CommitIo,
    /// Misconfiguration that no retry fixes (bad TLS setup, database not found, 4xx).
    Config,
    /// sqld stopped a request at the step where its answer passed the server's response size
    /// limits (`RESPONSE_TOO_LARGE`: one answer's, or the total of the answers in flight, which
    /// clears as other clients' answers go out): a write's earlier steps, its `COMMIT`
    /// included, may have run; a read is retried.
    ResponseTooLarge,
    /// Anything else: a bug or unexpected state.
    Other,
}

// SQLite primary result codes (stable across versions; libsql reports them as plain integers).
const SQLITE_ERROR: i32 = 1;
const SQLITE_INTERNAL: i32 = 2;
const SQLITE_PERM: i32 = 3;
const SQLITE_ABORT: i32 = 4;
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;
const SQLITE_NOMEM: i32 = 7;
const SQLITE_READONLY: i32 = 8;
const SQLITE_INTERRUPT: i32 = 9;
const SQLITE_IOERR: i32 = 10;
const SQLITE_CORRUPT: i32 = 11;
const SQLITE_NOTFOUND: i32 = 12;
const SQLITE_FULL: i32 = 13;
const SQLITE_CANTOPEN: i32 = 14;
const SQLITE_PROTOCOL: i32 = 15;
const SQLITE_TOOBIG: i32 = 18;
const SQLITE_CONSTRAINT: i32 = 19;
const SQLITE_MISMATCH: i32 = 20;
const SQLITE_MISUSE: i32 = 21;
const SQLITE_NOLFS: i32 = 22;
const SQLITE_RANGE: i32 = 25;
const SQLITE_NOTADB: i32 = 26;

/// SQLITE_IOERR_CORRUPTFS: the file system reported damage under the database (an I/O error
/// by its primary code, damage by what it says).
pub(crate) const SQLITE_IOERR_CORRUPTFS: i32 = SQLITE_IOERR | (33 << 8);

/// SQLITE_IOERR_GETTEMPPATH: no directory for a temporary file (an I/O error by its primary
/// code, the host's setup by what it says: not retried).
const SQLITE_IOERR_GETTEMPPATH: i32 = SQLITE_IOERR | (25 << 8);

/// Classify a SQLite result code (primary or extended).
pub(crate) fn class_of_code(code: i32) -> Class {
    if code == SQLITE_IOERR_CORRUPTFS {
        return Class::Corrupt;
    }
    if code == SQLITE_IOERR_GETTEMPPATH {
        return Class::Environment { retryable: false };
    }
    match code & 0xff {
        SQLITE_BUSY | SQLITE_LOCKED => Class::Busy,
        SQLITE_CORRUPT | SQLITE_NOTADB => Class::Corrupt,
        // SQLITE_PROTOCOL: a race on the WAL's locks, transient like busy (as dotdo-sqlite has it).
        SQLITE_PROTOCOL => Class::Busy,
        SQLITE_FULL | SQLITE_IOERR => Class::Environment { retryable: true },
        SQLITE_READONLY | SQLITE_CANTOPEN | SQLITE_PERM | SQLITE_NOLFS | SQLITE_NOMEM => {
            Class::Environment { retryable: false }
        }
        SQLITE_TOOBIG => Class::TooBig,
        SQLITE_ERROR | SQLITE_INTERNAL | SQLITE_ABORT | SQLITE_INTERRUPT | SQLITE_NOTFOUND | SQLITE_CONSTRAINT
        | SQLITE_MISMATCH | SQLITE_MISUSE | SQLITE_RANGE => Class::Other,
        _ => Class::Other,
    }
}

/// Classify a SQLite error code name as sent by sqld (`"SQLITE_BUSY"`, `"SQLITE_CORRUPT"`, …).
fn class_of_code_name(name: &str) -> Class {
    // The extended codes classed apart from their primary code (see `class_of_code`).
    if name == "SQLITE_IOERR_CORRUPTFS" {
        return Class::Corrupt;
    }
    if name == "SQLITE_IOERR_GETTEMPPATH" {
        return class_of_code(SQLITE_IOERR_GETTEMPPATH);
    }
    let code = match name.split('_').take(2).collect::<Vec<_>>().join("_").as_str() {
        "SQLITE_BUSY" => SQLITE_BUSY,
        "SQLITE_LOCKED" => SQLITE_LOCKED,
        "SQLITE_CORRUPT" => SQLITE_CORRUPT,
        "SQLITE_NOTADB" => SQLITE_NOTADB,
        "SQLITE_FULL" => SQLITE_FULL,
        "SQLITE_IOERR" => SQLITE_IOERR,
        "SQLITE_READONLY" => SQLITE_READONLY,
        "SQLITE_CANTOPEN" => SQLITE_CANTOPEN,
        "SQLITE_TOOBIG" => SQLITE_TOOBIG,
        "SQLITE_PROTOCOL" => SQLITE_PROTOCOL,
        "SQLITE_NOMEM" => SQLITE_NOMEM,
        "SQLITE_PERM" => SQLITE_PERM,
        "SQLITE_NOLFS" => SQLITE_NOLFS,
        _ => SQLITE_ERROR,
    };
    class_of_code(code)
}

/// Classify the message of a failed step of a remote batch. libsql's client reports it as
/// ``api error: `<message>` `` with the SQLite code dropped, so SQLite's own messages are matched.
/// Which step failed is dropped too, and dotdo's write batches end with a statement after their
/// `COMMIT` (see `Conn::run_program`): a lock timeout may therefore come after the commit, so it
/// counts as a server failure that may have been applied (retried for reads, an ambiguous
/// outcome for writes), never as a plain busy that is safe to repeat.
fn class_of_batch_step_message(message: &str) -> Class {
    let m = message.to_ascii_lowercase();
    if m.contains("database is locked") || m.contains("database table is locked") {
        Class::ServerUnavailable { maybe_applied: true }
    } else if m.contains("database disk image is malformed") || m.contains("file is not a database") {
        Class::Corrupt
    } else if m.contains("database or disk is full")
        || m.contains("disk i/o error")
        || m.contains("locking protocol")
        || m.contains("unable to open database file")
    {
        // Like a lock timeout, this may be the statement after the COMMIT (a race on the WAL's
        // locks, as `SQLITE_PROTOCOL` is busy locally; a file the server could not open just
        // then): an unknown outcome for writes, retried for reads. (A write told `Backend` was
        // reported failed although it may have committed, and sent again under its token.)
        Class::ServerUnavailable { maybe_applied: true }
    } else if m.contains("transaction timed out")
        || m.contains("cannot handle additional transactions")
        || m.contains("operation was blocked")
    {
        // sqld's own refusals (a transaction rolled back for outlasting `txn_timeout` while
        // another writer waited, too many open transactions, a blocked operation): it rolls
        // back between steps, so the failing step may be the one after the COMMIT too.
        Class::ServerUnavailable { maybe_applied: true }
    } else if m.contains("response is too large") || m.contains("response_too_large") {
        // sqld checks the answer's size at every step and stops the batch there: also at the
        // step after a write's COMMIT.
        Class::ResponseTooLarge
    } else if m == "interrupted" || m.ends_with(": interrupted") || m.contains("out of memory") {
        // Failures of the server, not of the statement: an interrupt or an allocation failure
        // hits whatever step runs, the one after a write's COMMIT included.
        Class::ServerUnavailable { maybe_applied: true }
    } else if m.contains("attempt to write a readonly database") {
        Class::Environment { retryable: false }
    } else if m.contains("string or blob too big") {
        Class::TooBig
    } else {
        Class::Other
    }
}

/// Whether `e` is sqld's refusal of the server stream a request named (nothing of the request
/// ran; a new connection works): see [`names_a_stale_stream`].
pub(crate) fn is_stream_expired(e: &libsql::Error) -> bool {
    names_a_stale_stream(&e.to_string())
}

/// Whether `text` is sqld's refusal of a request's server stream, made before any of the request
/// runs: a stream that expired while idle (`STREAM_EXPIRED`, for 5 minutes after the 10 s of
/// idleness), one cleaned up after that or lost to a restart of the server (its baton is then
/// unknown: `BATON_INVALID`, "Received an invalid baton" in sqld's plain-text answer), a baton
/// already used (`BATON_REUSED`: a request of an earlier call that was dropped by its caller
/// moved the stream on) or a stream closed (`BATON_STREAM_CLOSED`).
pub(crate) fn names_a_stale_stream(text: &str) -> bool {
    const REFUSALS: [&str; 7] = [
        "STREAM_EXPIRED",
        "BATON_INVALID",
        "BATON_REUSED",
        "BATON_STREAM_CLOSED",
        "Received an invalid baton",
        "Received a baton that has already been used",
        "Stream for this baton was closed",
    ];
    REFUSALS.iter().any(|r| text.contains(r))
}

/// Classify the `Display` text of a remote (Hrana) failure; see the module docs for why text.
pub(crate) fn class_of_remote_text(text: &str) -> Class {
    // sqld refuses a request on a server stream that expired while idle, or whose baton it no
    // longer knows, as a stream error or an HTTP 400 or 500: nothing of it ran, and a new
    // connection works.
    if names_a_stale_stream(text) {
        return Class::Network { maybe_sent: false };
    }
    if let Some(rest) = text.strip_prefix("api error: ") {
        // `status=401 Unauthorized, body=…`
        let status: u16 = rest
            .trim_start_matches('`')
            .strip_prefix("status=")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        return match status {
            401 | 403 => Class::Auth,
            // Too many requests; the request not received in time (nothing of it ran).
            408 | 429 => Class::ServerUnavailable { maybe_applied: false },
            // The server or a proxy in front of it refused the request's size (a remote value
            // travels as hex, twice its size): no retry changes that.
            413 => Class::TooBig,
            500..=599 => Class::ServerUnavailable { maybe_applied: true },
            400..=499 => Class::Config,
            _ => class_of_batch_step_message(rest.trim_matches('`')),
        };
    }
    if text.starts_with("http error: ") {
        // hyper 0.14's `Display`: only a failure to connect ("error trying to connect: …", DNS
        // and TLS handshake failures included) proves the request never left. "connection
        // error: Connection reset by peer", "error reading a body from connection: …" (the
        // server had answered), "connection closed before message completed": it may have run.
        // (`Error(Connect` is hyper's `Debug` form of the same kind.)
        let connect = ["error trying to connect", "Error(Connect,", "dns error", "failed to lookup"]
            .iter()
            .any(|m| text.contains(m));
        // A TLS handshake the primary's certificate failed (unknown issuer, wrong name, expired):
        // nothing was sent, and no retry changes it (it was retried as an outage for ever).
        if connect && text.contains("certificate") {
            return Class::Config;
        }
        return Class::Network { maybe_sent: !connect };
    }
    // The server answered, but its answer could not be read (a malformed or cut-off body, an
    // unexpected shape): the request ran, or may have.
    if text.starts_with("json error: ")
        || text.starts_with("unexpected response: ")
        || text.contains("cursor stream ended prematurely")
    {
        return Class::ServerUnavailable { maybe_applied: true };
    }
    if text.starts_with("stream error: ") || text.starts_with("cursor error: ") {
        if let Some(i) = text.find("SQLITE_") {
            let name: String =
                text[i..].chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect();
            return class_of_code_name(&name);
        }
        // sqld's refusals of a whole request (`TRANSACTION_BUSY`, `TRANSACTION_TIMEOUT`, with
        // their messages), and SQLite's messages without a code: as a failed batch step's.
        if text.contains("TRANSACTION_BUSY") || text.contains("TRANSACTION_TIMEOUT") {
            return Class::ServerUnavailable { maybe_applied: true };
        }
        let by_message = class_of_batch_step_message(text);
        if by_message != Class::Other {
            return by_message;
        }
        // A cursor (a remote read's streamed answer) whose body broke off after the headers (a
        // reset, a proxy cutting the connection) or arrived out of order: the server answered,
        // the request ran or may have. A failed statement (`error at step`) and a misuse of the
        // cursor are not.
        if text.starts_with("cursor error: ")
            && !text.contains("error at step")
            && !text.contains("hasn't fetched any rows")
        {
            return Class::ServerUnavailable { maybe_applied: true };
        }
        return Class::Other;
    }
    if text.starts_with("stream closed: ") {
        return Class::Network { maybe_sent: true };
    }
    Class::Other
}

/// Classify the text of an embedded replica's failure to pull (libsql_replication's errors): a
/// namespace the primary does not have or a rejected token are not worth retrying, nor is a
/// replica file that cannot take the frames (injector, meta file, snapshot, fatal errors); the
/// rest are the network's (the pull may have reached the primary).
pub(crate) fn class_of_replication_text(text: &str) -> Class {
    // A replica file SQLite finds damaged (whatever step of the pull found it): `Corrupt`.
    if text.contains("database disk image is malformed") || text.contains("file is not a database") {
        Class::Corrupt
    } else if text.contains("database is locked") || text.contains("database table is locked") {
        // The injector's own connection (no busy timeout) found the replica file locked (a
        // reader's WAL recovery, a last-close checkpoint): busy, for a later pull.
        Class::Busy
    } else if text.contains("namespace doesn't exist") {
        Class::Config
    } else if text.contains("Unauthenticated") || text.contains("PermissionDenied") || text == "Unauthorized" {
        // (`Unauthorized`: libsql's replica build, with its `sync` feature on in the binary
        // through another crate, probes the primary's `/info` first and answers a 401 so.)
        Class::Auth
    } else if [
        "Injector error",
        "Fatal replicator error",
        "Replication meta error",
        "Invalid snapshot file",
        "Invalid frame length",
    ]
    .iter()
    .any(|m| text.contains(m))
    {
        Class::Environment { retryable: false }
    } else {
        Class::Network { maybe_sent: true }
    }
}

/// libsql reports a local file it cannot open (a missing directory, no permission) as
/// `ConnectionFailed`, the variant of an unreachable primary: on a local (or replica) file it is
/// SQLite's `CANTOPEN`, not worth retrying.
pub(crate) fn local_open_failure(e: libsql::Error) -> libsql::Error {
    match e {
        libsql::Error::ConnectionFailed(m) => libsql::Error::SqliteFailure(SQLITE_CANTOPEN, m),
        e => e,
    }
}

/// Classify a libsql error.
pub(crate) fn class_of(e: &libsql::Error) -> Class {
    use libsql::Error as E;
    match e {
        E::SqliteFailure(code, _) => class_of_code(*code),
        E::RemoteSqliteFailure(code, _, _) => class_of_code(*code),
        E::ConnectionFailed(_) => Class::Network { maybe_sent: false },
        E::Hrana(inner) => class_of_remote_text(&inner.to_string()),
        E::WriteDelegation(inner) => match class_of_remote_text(&inner.to_string()) {
            Class::Other => Class::Network { maybe_sent: true },
            c => c,
        },
        E::Replication(inner) => class_of_replication_text(&inner.to_string()),
        E::Sync(inner) => class_of_replication_text(&inner.to_string()),
        E::InvalidTlsConfiguration(_) => Class::Config,
        // The batch ran to its end (its COMMIT included) but its result could not be read.
        E::Misuse(m) if m.starts_with(crate::conn::UNREADABLE_RESULT) => {
            Class::ServerUnavailable { maybe_applied: true }
        }
        E::Misuse(m) if m.starts_with(crate::conn::COMMIT_IO_ERROR) => Class::CommitIo,
        // A stored value of the wrong type (dotdo's decoders and libsql's own): the file was
        // damaged or written by something else, as dotdo-sqlite reports it.
        E::InvalidColumnType => Class::Corrupt,
        E::NullValue
        | E::Misuse(_)
        | E::ExecuteReturnedRows
        | E::QueryReturnedNoRows
        | E::InvalidColumnName(_)
        | E::ToSqlConversionFailure(_)
        | E::SyncNotSupported(_)
        | E::LoadExtensionNotSupported
        | E::AuthorizerNotSupported
        | E::UpdateHookNotSupported
        | E::ColumnNotFound(_)
        | E::Bincode(_)
        | E::InvalidColumnIndex
        | E::Sqlite3SyntaxError(..)
        | E::Sqlite3UnsupportedStatement
        | E::Sqlite3ParserError(_)
        | E::InvalidUTF8Path
        | E::FreezeNotSupported(_)
        | E::InvalidParserState(_)
        | E::TransactionalBatchError(_)
        | E::InvalidBlobSize(_)
        | E::WalConflict
        | E::ReservedBytesNotSupported => Class::Other,
        _ => Class::Other,
    }
}

/// Whether the store retries a failure of this class by itself (bounded, with backoff).
/// `mutating` calls are not retried when the request may have been applied.
pub(crate) fn is_transient(class: Class, mutating: bool) -> bool {
    match class {
        Class::Busy => true,
        Class::ServerUnavailable { maybe_applied } => !(mutating && maybe_applied),
        Class::Network { maybe_sent } => !(mutating && maybe_sent),
        Class::ResponseTooLarge => !mutating,
        _ => false,
    }
}

/// Map a classified libsql error, with what we were doing, to the public error.
pub(crate) fn map_class(class: Class, e: libsql::Error, doing: &str, mutating: bool) -> Error {
    let err = match class {
        Class::Busy => Error::unavailable(format!("{doing}: database is busy (locked by another connection)")),
        Class::Corrupt => Error::corrupt(format!("{doing}: the file is not a healthy SQLite database")),
        Class::Environment { retryable } => {
            Error::new(ErrorKind::Unavailable, format!("{doing}: storage environment failure"))
                .with_retryable(retryable)
        }
        Class::TooBig => Error::new(
            ErrorKind::LimitExceeded { what: "libsql value or request", limit: 0, actual: 0 },
            format!("{doing}: too large (a value over SQLite's limit, or a request over the server's or a proxy's; the limit is not known here)"),
        ),
        Class::Network { maybe_sent } if mutating && maybe_sent => Error::new(
            ErrorKind::AmbiguousOutcome,
            format!("{doing}: the connection to the primary broke off after the request was sent; it may still be applied (take a new lease before writing the object again)"),
        ),
        Class::Network { .. } => Error::unavailable(format!("{doing}: the primary cannot be reached")),
        Class::ServerUnavailable { maybe_applied: true } if mutating => Error::new(
            ErrorKind::AmbiguousOutcome,
            format!("{doing}: the primary (or a gateway) failed while handling the request; it may still be applied (take a new lease before writing the object again)"),
        ),
        Class::ServerUnavailable { .. } => Error::unavailable(format!("{doing}: the primary is temporarily unavailable")),
        Class::CommitIo => Error::new(
            ErrorKind::AmbiguousOutcome,
            format!("{doing}: COMMIT failed with an I/O error or out of memory; the transaction may still be applied (by WAL recovery after a restart)"),
        ),
        Class::Auth => Error::backend(format!(
            "{doing}: the primary rejected the auth token (HTTP 401/403); check the token and its permissions"
        ))
        .with_retryable(false),
        Class::Config => Error::backend(format!("{doing}: the primary rejected the request (configuration)"))
            .with_retryable(false),
        Class::ResponseTooLarge if mutating => Error::new(
            ErrorKind::AmbiguousOutcome,
            format!("{doing}: the primary stopped the request at its response size limit; it may still be applied (take a new lease before writing the object again)"),
        ),
        Class::ResponseTooLarge => Error::unavailable(format!(
            "{doing}: the answer passed the primary's response size limits (sqld's max_response_size, or \
             max_total_response_size under load)"
        )),
        Class::Other => Error::backend(format!("{doing}: libsql failure")),
    };
    err.with_source(e)
}

/// Map a libsql error, with what we were doing, to the public error.
pub(crate) fn map(e: libsql::Error, doing: &str, mutating: bool) -> Error {
    map_class(class_of(&e), e, doing, mutating)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: i32) -> libsql::Error {
        libsql::Error::SqliteFailure(code, "x".into())
    }

    fn hrana(text: &str) -> libsql::Error {
        libsql::Error::Hrana(text.to_string().into())
    }

    /// Failures of the server rather than of a statement, which sqld reports at whatever step of
    /// a batch runs when they strike, the one after a write's `COMMIT` included (its response
    /// budget, an interrupt, an allocation failure): an unknown outcome for writes, retried for
    /// reads. A write told `Backend` (not retryable, nothing said of the outcome) was reported
    /// failed although it may have committed.
    #[test]
    fn server_failures_at_any_step_may_follow_a_commit() {
        for text in [
            "api error: `interrupted`",
            "stream error: `Error { message: \"out of memory\", code: \"UNKNOWN\" }`",
            "api error: `SQLite error: locking protocol`",
            "api error: `SQLite error: unable to open database file`",
        ] {
            assert_eq!(map(hrana(text), "write", true).kind(), &ErrorKind::AmbiguousOutcome, "{text}");
            let read = map(hrana(text), "get", false);
            assert_eq!(read.kind(), &ErrorKind::Unavailable, "{text}: {read}");
            assert!(is_transient(class_of(&hrana(text)), false), "{text}");
        }
        // The answer's size limits: an unknown outcome for writes; reads are retried (the total
        // of the answers in flight is one of them, and clears).
        for text in [
            "stream error: `Error { message: \"Response is too large\", code: \"RESPONSE_TOO_LARGE\" }`",
            "api error: `Response is too large`",
        ] {
            assert_eq!(map(hrana(text), "write", true).kind(), &ErrorKind::AmbiguousOutcome, "{text}");
            let read = map(hrana(text), "get", false);
            assert_eq!(read.kind(), &ErrorKind::Unavailable, "{text}: {read}");
            assert!(read.is_retryable() && is_transient(class_of(&hrana(text)), false), "{text}");
        }
        // A statement's own failure stays what it was.
        let text = "api error: `UNIQUE constraint failed: do_state.key`";
        assert_eq!(map(hrana(text), "write", true).kind(), &ErrorKind::Backend, "{text}");
    }

    /// sqld's refusal of a whole request (`TRANSACTION_BUSY` / `TRANSACTION_TIMEOUT`, sent as a
    /// stream error with no SQLite code) is transient, and may have followed a COMMIT: retried
    /// for reads, an unknown outcome for writes (it was a non-retryable `Backend` error).
    #[test]
    fn sqlds_whole_request_refusals_are_transient() {
        for text in [
            "stream error: `Error { message: \"Server cannot handle additional transactions\", code: \"TRANSACTION_BUSY\" }`",
            "stream error: `Error { message: \"Transaction timed out\", code: \"TRANSACTION_TIMEOUT\" }`",
        ] {
            let read = map(hrana(text), "get", false);
            assert_eq!(read.kind(), &ErrorKind::Unavailable, "{text}: {read}");
            assert!(read.is_retryable() && is_transient(class_of(&hrana(text)), false), "{text}");
            assert_eq!(map(hrana(text), "write", true).kind(), &ErrorKind::AmbiguousOutcome, "{text}");
        }
    }

    /// SQLITE_PROTOCOL (a race on the WAL's locks) is transient like busy, locally and remotely,
    /// as dotdo-sqlite has it; remote NOMEM/PERM/NOLFS read like the local codes.
    #[test]
    fn protocol_errors_are_transient_everywhere() {
        assert!(is_transient(class_of(&failure(SQLITE_PROTOCOL)), false));
        let remote = hrana("cursor error: `error at step 0: (error code: SQLITE_PROTOCOL) `locking protocol``");
        assert_eq!(class_of(&remote), class_of(&failure(SQLITE_PROTOCOL)));
        for (name, code) in
            [("SQLITE_NOMEM", SQLITE_NOMEM), ("SQLITE_PERM", SQLITE_PERM), ("SQLITE_NOLFS", SQLITE_NOLFS)]
        {
            let remote = hrana(&format!("cursor error: `error at step 0: (error code: {name}) `x``"));
            assert_eq!(class_of(&remote), class_of(&failure(code)), "{name}");
        }
    }

    #[test]
    fn a_cursor_cut_off_after_the_headers_is_retried_for_reads_and_ambiguous_for_writes() {
        let cut = hrana("cursor error: `error reading a body from connection: connection reset`");
        assert_eq!(class_of(&cut), Class::ServerUnavailable { maybe_applied: true });
        assert!(is_transient(class_of(&cut), false), "a read is retried");
        assert!(!is_transient(class_of(&cut), true));
        assert_eq!(map(cut, "put", true).kind(), &ErrorKind::AmbiguousOutcome);
        let order = hrana("cursor error: `cursor step 2 arrived before step 1 end message`");
        assert_eq!(class_of(&order), Class::ServerUnavailable { maybe_applied: true });
        // A failed statement and a misuse are not transient.
        for text in
            ["cursor error: `error at step 0: no such table: x`", "cursor error: `cursor hasn't fetched any rows yet`"]
        {
            assert_eq!(class_of(&hrana(text)), Class::Other, "{text}");
        }
    }

    #[test]
    fn permanent_replication_failures_are_not_retried() {
        let rep = |t: &str| libsql::Error::Replication(t.to_string().into());
        for (text, class) in [
            ("Requested namespace doesn't exist", Class::Config),
            ("Replicator client error: status: Unauthenticated, message: \"bad token\"", Class::Auth),
            ("Injector error: SQLite error: disk I/O error", Class::Environment { retryable: false }),
            ("Fatal replicator error: boom", Class::Environment { retryable: false }),
            ("Replication meta error: Invalid meta file", Class::Environment { retryable: false }),
            ("Injector error: SQLite error: database disk image is malformed", Class::Corrupt),
            ("Injector error: SQLite error: file is not a database", Class::Corrupt),
            ("Injector error: SQLite error: database is locked", Class::Busy),
            ("Replicator client error: transport error", Class::Network { maybe_sent: true }),
            ("Timeout performing handshake with primary", Class::Network { maybe_sent: true }),
        ] {
            assert_eq!(class_of(&rep(text)), class, "{text}");
        }
        let e = map(rep("Requested namespace doesn't exist"), "syncing", false);
        assert!(!e.is_retryable(), "{e}");
        // A replica build's probe of the primary answered 401 (libsql with its `sync` feature).
        let probe = libsql::Error::Sync("Unauthorized".into());
        assert_eq!(class_of(&probe), Class::Auth);
        assert!(!map(probe, "opening a replica", false).is_retryable());
    }

    #[test]
    fn a_local_file_that_cannot_be_opened_is_not_the_network() {
        let e = local_open_failure(libsql::Error::ConnectionFailed("unable to open database file".into()));
        assert_eq!(class_of(&e), Class::Environment { retryable: false });
        let e = map(e, "opening /x/hot.db", false);
        assert!(!e.is_retryable() && !e.to_string().contains("primary"), "{e}");
    }

    #[test]
    fn busy_and_locked_are_unavailable_and_retryable() {
        for code in [SQLITE_BUSY, SQLITE_LOCKED, 261 /* SQLITE_BUSY_RECOVERY */, 517 /* BUSY_SNAPSHOT */] {
            let e = map(failure(code), "write", true);
            assert_eq!(e.kind(), &ErrorKind::Unavailable);
            assert!(e.is_retryable());
            assert!(is_transient(class_of(&failure(code)), true));
        }
    }

    #[test]
    fn corruption_and_not_a_database_are_corrupt() {
        for code in [SQLITE_CORRUPT, SQLITE_NOTADB, 267 /* CORRUPT_VTAB */, SQLITE_IOERR_CORRUPTFS] {
            let e = map(failure(code), "open", false);
            assert_eq!(e.kind(), &ErrorKind::Corrupt);
            assert!(!e.is_retryable());
        }
        let e = map(libsql::Error::RemoteSqliteFailure(SQLITE_CORRUPT, SQLITE_CORRUPT, "bad".into()), "get", false);
        assert_eq!(e.kind(), &ErrorKind::Corrupt);
    }

    #[test]
    fn environment_failures_are_unavailable() {
        let e = map(failure(SQLITE_FULL), "write", true);
        assert_eq!(e.kind(), &ErrorKind::Unavailable);
        assert!(e.is_retryable());
        let e = map(failure(SQLITE_READONLY), "write", true);
        assert_eq!(e.kind(), &ErrorKind::Unavailable);
        assert!(!e.is_retryable());
        assert_eq!(map(failure(SQLITE_CANTOPEN), "open", false).kind(), &ErrorKind::Unavailable);
        let e = map(failure(SQLITE_IOERR_GETTEMPPATH), "write", false);
        assert_eq!(e.kind(), &ErrorKind::Unavailable);
        assert!(!e.is_retryable(), "no temporary directory is no passing failure: {e}");
    }

    #[test]
    fn other_failures_are_backend_errors() {
        assert_eq!(map(failure(SQLITE_CONSTRAINT), "x", true).kind(), &ErrorKind::Backend);
        assert_eq!(map(libsql::Error::QueryReturnedNoRows, "x", false).kind(), &ErrorKind::Backend);
        assert_eq!(map(libsql::Error::Misuse("m".into()), "x", false).kind(), &ErrorKind::Backend);
        assert!(matches!(map(failure(SQLITE_TOOBIG), "x", true).kind(), ErrorKind::LimitExceeded { .. }));
    }

    #[test]
    fn unreachable_primary_is_unavailable_and_retryable() {
        let refused = hrana(
            "http error: `hyper::Error(Connect, ConnectError(\"tcp connect error\", Os { code: 111, kind: ConnectionRefused, message: \"Connection refused\" }))`",
        );
        assert_eq!(class_of(&refused), Class::Network { maybe_sent: false });
        let e = map(refused, "write", true);
        assert_eq!(e.kind(), &ErrorKind::Unavailable);
        assert!(e.is_retryable());
        let e = map(libsql::Error::ConnectionFailed("no route".into()), "get", false);
        assert_eq!(e.kind(), &ErrorKind::Unavailable);
        assert!(e.is_retryable());
    }

    /// The texts libsql really produces (hyper 0.14's `Display`): a reset connection, or a body
    /// cut off after the server answered, may have run the request; a failure to connect (TCP,
    /// DNS, TLS) did not.
    #[test]
    fn only_a_failure_to_connect_counts_as_not_sent() {
        for maybe_sent in [
            "http error: `connection error: Connection reset by peer (os error 104)`",
            "http error: `error reading a body from connection: Connection reset by peer (os error 104)`",
            "http error: `connection closed before message completed`",
            "http error: `error writing a body to connection: Broken pipe (os error 32)`",
        ] {
            assert_eq!(class_of(&hrana(maybe_sent)), Class::Network { maybe_sent: true }, "{maybe_sent}");
            assert_eq!(map(hrana(maybe_sent), "write", true).kind(), &ErrorKind::AmbiguousOutcome, "{maybe_sent}");
            assert!(!is_transient(class_of(&hrana(maybe_sent)), true), "a write is not repeated: {maybe_sent}");
        }
        for unreadable_answer in [
            "json error: `EOF while parsing a list at line 1 column 26`",
            "unexpected response: `expected 5 results, got 2`",
            "cursor error: `cursor stream ended prematurely`",
        ] {
            assert_eq!(map(hrana(unreadable_answer), "write", true).kind(), &ErrorKind::AmbiguousOutcome);
            let read = map(hrana(unreadable_answer), "get", false);
            assert!(read.kind() == &ErrorKind::Unavailable && read.is_retryable(), "{read}");
        }
        for not_sent in [
            "http error: `error trying to connect: tcp connect error: Connection refused (os error 111)`",
            "http error: `error trying to connect: dns error: failed to lookup address information`",
        ] {
            assert_eq!(class_of(&hrana(not_sent)), Class::Network { maybe_sent: false }, "{not_sent}");
            assert_eq!(map(hrana(not_sent), "write", true).kind(), &ErrorKind::Unavailable, "{not_sent}");
        }
        // A certificate the TLS handshake refused: nothing sent, and no retry changes it.
        for cert in [
            "http error: `error trying to connect: invalid peer certificate: UnknownIssuer`",
            "http error: `error trying to connect: invalid peer certificate: NotValidForName`",
        ] {
            assert_eq!(class_of(&hrana(cert)), Class::Config, "{cert}");
            let e = map(hrana(cert), "write", true);
            assert!(!e.is_retryable(), "{cert}: {e}");
            assert_ne!(e.kind(), &ErrorKind::AmbiguousOutcome, "{cert}: {e}");
        }
    }

    #[test]
    fn a_broken_exchange_after_sending_a_write_is_ambiguous_not_retried() {
        let broken = hrana("http error: `hyper::Error(IncompleteMessage)`");
        assert_eq!(class_of(&broken), Class::Network { maybe_sent: true });
        assert!(!is_transient(class_of(&broken), true));
        assert!(is_transient(class_of(&broken), false), "a read is safe to retry");
        let e = map(hrana("http error: `hyper::Error(IncompleteMessage)`"), "write", true);
        assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome);
        assert!(!e.is_retryable());
        let e = map(hrana("http error: `hyper::Error(IncompleteMessage)`"), "get", false);
        assert_eq!(e.kind(), &ErrorKind::Unavailable);
    }

    #[test]
    fn auth_failures_are_backend_errors_with_a_clear_message_and_not_retryable() {
        for status in ["401 Unauthorized", "403 Forbidden"] {
            let e = map(hrana(&format!("api error: `status={status}, body=nope`")), "open", false);
            assert_eq!(e.kind(), &ErrorKind::Backend);
            assert!(!e.is_retryable());
            assert!(e.to_string().contains("auth token"), "{e}");
        }
    }

    #[test]
    fn server_overload_is_retryable_and_client_errors_are_not() {
        for status in ["503 Service Unavailable", "502 Bad Gateway", "429 Too Many Requests"] {
            let e = map(hrana(&format!("api error: `status={status}, body=`")), "get", false);
            assert_eq!(e.kind(), &ErrorKind::Unavailable, "{status}");
            assert!(e.is_retryable());
        }
        for status in ["502 Bad Gateway", "503 Service Unavailable"] {
            let e = map(hrana(&format!("api error: `status={status}, body=`")), "write", true);
            assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{status}: a gateway failure may hide an applied write");
        }
        assert!(!is_transient(class_of(&hrana("api error: `status=500 x, body=`")), true));
        assert!(!is_transient(class_of(&hrana("api error: `status=503 x, body=`")), true));
        assert!(is_transient(class_of(&hrana("api error: `status=429 x, body=`")), true));
        // A request not received in time ran nothing; one too large never runs.
        let e = map(hrana("api error: `status=408 Request Timeout, body=`"), "put", true);
        assert!(e.kind() == &ErrorKind::Unavailable && e.is_retryable(), "{e}");
        let e = map(hrana("api error: `status=413 Payload Too Large, body=`"), "put", true);
        assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }) && !e.is_retryable(), "{e}");
        let e = map(hrana("api error: `status=404 Not Found, body=no such namespace`"), "get", false);
        assert_eq!(e.kind(), &ErrorKind::Backend);
        assert!(!e.is_retryable());
    }

    #[test]
    fn remote_sql_errors_are_classified_by_their_code() {
        let busy = hrana("stream error: `Error { message: \"database is locked\", code: \"SQLITE_BUSY\" }`");
        assert_eq!(class_of(&busy), Class::Busy);
        let corrupt = hrana("stream error: `Error { message: \"malformed\", code: \"SQLITE_CORRUPT_VTAB\" }`");
        assert_eq!(class_of(&corrupt), Class::Corrupt);
        let damaged_fs =
            hrana("stream error: `Error { message: \"disk I/O error\", code: \"SQLITE_IOERR_CORRUPTFS\" }`");
        assert_eq!(class_of(&damaged_fs), Class::Corrupt);
        let io = hrana("stream error: `Error { message: \"disk I/O error\", code: \"SQLITE_IOERR_WRITE\" }`");
        assert_eq!(class_of(&io), Class::Environment { retryable: true });
        let no_temp =
            hrana("stream error: `Error { message: \"disk I/O error\", code: \"SQLITE_IOERR_GETTEMPPATH\" }`");
        assert_eq!(class_of(&no_temp), Class::Environment { retryable: false });
        let constraint = hrana("stream error: `Error { message: \"UNIQUE\", code: \"SQLITE_CONSTRAINT_UNIQUE\" }`");
        assert_eq!(class_of(&constraint), Class::Other);
        assert_eq!(class_of(&hrana("stream closed: `baton expired`")), Class::Network { maybe_sent: true });
        assert_eq!(class_of(&hrana("something new")), Class::Other);
    }

    #[test]
    fn failed_batch_steps_are_classified_by_sqlites_message() {
        // What libsql's client makes of a failed step of a batch: the message only.
        let locked = hrana("api error: `database is locked`");
        assert_eq!(class_of(&locked), Class::ServerUnavailable { maybe_applied: true });
        let e = map(hrana("api error: `database is locked`"), "get", false);
        assert_eq!(e.kind(), &ErrorKind::Unavailable);
        assert!(e.is_retryable());
        // A write's batch may have committed before the step that timed out.
        let e = map(hrana("api error: `database is locked`"), "write", true);
        assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome);
        assert_eq!(class_of(&hrana("api error: `database disk image is malformed`")), Class::Corrupt);
        // Also possibly the statement after the COMMIT.
        let full = map(hrana("api error: `database or disk is full`"), "write", true);
        assert_eq!(full.kind(), &ErrorKind::AmbiguousOutcome, "{full}");
        // sqld's forced rollback of a transaction that outlasted txn_timeout (possibly after the
        // COMMIT step ran), and its other refusals: maybe applied, never a plain Backend.
        for m in ["Transaction timed out", "Server cannot handle additional transactions", "Operation was blocked"] {
            let e = map(hrana(&format!("api error: `{m}`")), "write", true);
            assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{m}: {e}");
            let e = map(hrana(&format!("api error: `{m}`")), "get", false);
            assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Unavailable, true), "{m}: {e}");
        }
        // A batch that ran through its COMMIT but whose result could not be read was applied.
        // A local COMMIT that failed on I/O (here SQLITE_IOERR_FSYNC) may be applied by recovery;
        // a COMMIT refused as busy was not applied.
        let io = crate::conn::commit_failure(failure(1034));
        assert_eq!(map(io, "write", true).kind(), &ErrorKind::AmbiguousOutcome);
        // (Out of memory too: SQLite indexes the WAL after writing the commit's frames.)
        let nomem = crate::conn::commit_failure(failure(7));
        assert_eq!(map(nomem, "write", true).kind(), &ErrorKind::AmbiguousOutcome);
        let busy = crate::conn::commit_failure(failure(SQLITE_BUSY));
        assert_eq!(map(busy, "write", true).kind(), &ErrorKind::Unavailable);
        // The file system reporting damage stays `Corrupt`, at COMMIT as anywhere.
        let damaged = crate::conn::commit_failure(failure(SQLITE_IOERR_CORRUPTFS));
        assert_eq!(map(damaged, "write", true).kind(), &ErrorKind::Corrupt);
        let unreadable = libsql::Error::Misuse(format!("{}rowid 5", crate::conn::UNREADABLE_RESULT));
        assert_eq!(map(unreadable, "write", true).kind(), &ErrorKind::AmbiguousOutcome);
        assert_eq!(map(libsql::Error::Misuse("other".into()), "write", true).kind(), &ErrorKind::Backend);
        assert_eq!(class_of(&hrana("api error: `UNIQUE constraint failed: do_changes.seq`")), Class::Other);
    }

    #[test]
    fn an_expired_server_stream_is_retried_as_not_applied() {
        let e = hrana(
            "api error: `status=400 Bad Request, body={\"message\":\"stream expired\",\"code\":\"STREAM_EXPIRED\"}`",
        );
        assert_eq!(class_of(&e), Class::Network { maybe_sent: false });
        let e = hrana("stream error: `Error { message: \"stream baton-4 not found\", code: \"STREAM_EXPIRED\" }`");
        assert_eq!(class_of(&e), Class::Network { maybe_sent: false });
        assert!(is_transient(class_of(&e), true), "safe to retry even a write");
        // After the expired stream is cleaned up (5 minutes on), or once sqld restarted, its baton
        // is unknown: sqld answers 400 with its protocol error as plain text. A baton moved on by
        // a request an earlier call dropped is refused alike.
        for body in [
            "Received an invalid baton",
            "Received a baton that has already been used",
            "Stream for this baton was closed",
            "{\"message\":\"invalid baton\",\"code\":\"BATON_INVALID\"}",
            "{\"message\":\"baton reused\",\"code\":\"BATON_REUSED\"}",
        ] {
            let e = hrana(&format!("api error: `status=400 Bad Request, body={body}`"));
            assert_eq!(class_of(&e), Class::Network { maybe_sent: false }, "{body}");
            assert!(is_stream_expired(&e), "{body}");
        }
        // Another 400 stays a refusal of the request itself.
        let e = hrana("api error: `status=400 Bad Request, body=Cannot deserialize client message from JSON`");
        assert_eq!(class_of(&e), Class::Config);
        assert!(!is_stream_expired(&e));
    }

    #[test]
    fn tls_misconfiguration_is_not_retryable() {
        let e = map(libsql::Error::InvalidTlsConfiguration(std::io::Error::other("no roots")), "open", false);
        assert_eq!(e.kind(), &ErrorKind::Backend);
        assert!(!e.is_retryable());
    }
}
