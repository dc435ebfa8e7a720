//! The one place where iceberg, object_store, parquet, arrow and sqlx errors become
//! [`dotdo_core::Error`]s.
//!
//! Rules (each has a unit test below):
//!
//! * an unreachable or failing store, a busy or unreachable catalog database, a timeout, a REST
//!   catalog connection that broke → `Unavailable`, retryable;
//! * a store request that can never succeed (an HTTP 4xx other than 408/429, a local path that
//!   is not a directory, a full or read-only disk) → `Backend`, not retryable;
//! * a file shorter than its metadata says (a read past its end) → `Corrupt`;
//! * a missing or undecodable data / metadata / manifest file → `Corrupt`, naming the file
//!   (also a decoder's own I/O error, such as zstd's under a damaged Avro manifest; a failed
//!   write or fsync passing through parquet's writer stays the store's: `Unavailable`);
//!   an I/O or decoding error *below* a failed store or catalog connection (a peer closing
//!   early reads as an unexpected EOF) is the connection breaking, so also `Unavailable`; a REST
//!   catalog's (or its OAuth token endpoint's) 408, 429 or 5xx answer other than 501 →
//!   `Unavailable`;
//! * the token endpoint refusing the credential (400, 401, 403) or answering no token, or a
//!   catalog's 200 that does not parse → `Backend`; the endpoint not found (3xx, 404, 405) or a
//!   `header.*`/`token` property no HTTP header can carry → `InvalidInput`; such errors never
//!   show a response body or a header's value (they may hold credentials);
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
    /// The store refused a request that can never succeed as it is (a 4xx answer, a path that
    /// is not a directory, a full or read-only disk).
    StoreRefused,
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
        // A missing bucket or container is a configuration error, not a missing (damaged) file:
        // the error code in the store's answer (S3's and Azure's XML bodies), not the words
        // anywhere (the path and the request URL hold a table's own name, which may be those).
        E::NotFound { .. } if names_missing_container(&chain_text(e)) => Cause::Config,
        E::NotFound { path, .. } => Cause::Missing(path.clone()),
        E::Generic { .. } => generic_cause(e),
        E::JoinError { .. } => Cause::StoreUnavailable,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => Cause::StoreDenied,
        E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } | E::NotSupported { .. } | E::NotImplemented => {
            Cause::Config
        }
        E::AlreadyExists { .. } | E::Precondition { .. } | E::NotModified { .. } => Cause::Other,
        _ => Cause::StoreUnavailable,
    }
}

/// A `Generic` store error: transient (a connection, a timeout, a throttled or failing server),
/// unless it says the request can never succeed as it is. object_store keeps the types that say
/// so private (its range and HTTP status errors), so their texts (object_store 0.12, pinned by
/// the unit tests below) are what is left to go by; I/O errors under it are typed.
fn generic_cause(e: &object_store::Error) -> Cause {
    // The local store's own I/O: a network store's `EPERM` is a connection a firewall refused
    // (netfilter dropping a SYN, a full conntrack table), an outage, not a file's permissions.
    let local = matches!(e, object_store::Error::Generic { store, .. } if *store == "LocalFileSystem");
    let mut text = e.to_string();
    let mut cur = StdError::source(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io_refused(io.kind()) || io.kind() == std::io::ErrorKind::InvalidInput {
                return Cause::StoreRefused;
            }
            // A file or directory the process may not write or read (the local store reports it
            // as a generic I/O error): for the operator, as the store's own denials are.
            if io.kind() == std::io::ErrorKind::PermissionDenied && local {
                return Cause::StoreDenied;
            }
        }
        text.push_str(": ");
        text.push_str(&err.to_string());
        cur = err.source();
    }
    // A read starting past the end of the object (the local and in-memory stores' range errors):
    // the file is shorter than its metadata says.
    if text.contains("but object was only") || text.contains("Out of range of file") {
        return Cause::Undecodable;
    }
    // A range the store cannot serve as asked (an empty or inverted range, from a damaged
    // footer; a server that answers a range request whole or with other bytes): retrying asks
    // the same again.
    if text.contains("Received non-partial response when range requested")
        || (text.contains("Range started at") && text.contains("and ended at"))
        || (text.contains("Requested") && text.contains(", got "))
    {
        return Cause::Undecodable;
    }
    // S3's bare redirect: a bucket in another region than configured.
    if text.contains("Received redirect without LOCATION") {
        return Cause::Config;
    }
    // A certificate the TLS client does not accept (rustls: self-signed without
    // `allow_invalid_certificates`, a name it is not valid for, such as a bucket with dots under
    // virtual-hosted style): no retry is accepted either (it was `Unavailable`, retried for
    // good).
    // (While connecting only: one on a connection already in use broke a request under way,
    // an outage, as for a REST catalog.)
    if refused_while_connecting(e, &text) {
        return Cause::Config;
    }
    // The HTTP client refused to build the request (an `http://` endpoint without
    // `allow_http`, an endpoint without a scheme): no retry sends it.
    if text.contains("builder error") || text.contains("URL scheme is not allowed") {
        return Cause::Config;
    }
    const STATUS: &str = "status code: ";
    let status = text
        .find(STATUS)
        .and_then(|i| text.get(i + STATUS.len()..i + STATUS.len() + 3))
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        // A range read starting past the end of the object (S3's `InvalidRange`): the file is
        // shorter than its metadata says, like the local stores' range errors above.
        Some(416) => Cause::Undecodable,
        Some(408 | 429) => Cause::StoreUnavailable,
        // S3 answers a slow upload with 400 `RequestTimeout`, which its own SDKs retry.
        // (The error code in its XML body: the words alone may be in the request's URI.)
        Some(400) if text.contains("<Code>RequestTimeout</Code>") => Cause::StoreUnavailable,
        Some(400..=499) => Cause::StoreRefused,
        // A redirect object_store did not follow (to another endpoint or region).
        Some(300..=399) => Cause::Config,
        // A request the store does not implement (S3 answers 501 for an unsupported header or
        // operation, after which object_store's own retries have run out): not the server's
        // passing trouble, as the other 5xx are.
        Some(501 | 505) => Cause::StoreRefused,
        _ => Cause::StoreUnavailable,
    }
}

/// Whether `e` (its chain's text: `text`) is the TLS client refusing the server while
/// connecting ([`tls_refused`]): configuration, no retry accepted. On a connection already in
/// use the same error broke a request under way, an outage (see [`broke_after_connecting`]).
fn refused_while_connecting(e: &(dyn StdError + 'static), text: &str) -> bool {
    tls_refused(text) && !broke_after_connecting(e)
}

/// Whether `e`'s HTTP request failed after its connection was made (a `reqwest` error other
/// than connecting or building the request).
/// (Without the `rest` feature dotdo-iceberg does not link reqwest to look; the object stores'
/// TLS errors are then taken as refusals while connecting, as before.)
#[cfg(feature = "rest")]
fn broke_after_connecting(e: &(dyn StdError + 'static)) -> bool {
    chain(e).any(|err| err.downcast_ref::<reqwest::Error>().is_some_and(|r| !r.is_connect() && !r.is_builder()))
}

#[cfg(not(feature = "rest"))]
fn broke_after_connecting(_: &(dyn StdError + 'static)) -> bool {
    false
}

/// Whether an error's text (with its source chain) is the TLS client refusing the server for
/// good: a certificate it does not accept (rustls: self-signed without
/// `allow_invalid_certificates`, a private CA, another name), or an answer that is no TLS at
/// all (an `https://` URL for a plain-HTTP server: "received corrupt message"). No retry is
/// accepted either (while connecting: see [`broke_after_connecting`]).
fn tls_refused(text: &str) -> bool {
    text.contains("invalid peer certificate") || text.contains("received corrupt message")
}

/// An error's text with its whole source chain.
/// Whether an error chain's text holds the store's code for a missing bucket or container.
fn names_missing_container(text: &str) -> bool {
    text.contains("<Code>NoSuchBucket</Code>") || text.contains("<Code>ContainerNotFound</Code>")
}

/// `e` and its sources, outermost first.
pub(crate) fn chain<'a>(e: &'a (dyn StdError + 'static)) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(e), |&err| err.source())
}

fn chain_text(e: &dyn StdError) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        text.push_str(": ");
        text.push_str(&err.to_string());
        cur = err.source();
    }
    text
}

fn io_cause(e: &std::io::Error) -> Cause {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound => Cause::Missing(String::new()),
        K::InvalidData | K::UnexpectedEof => Cause::Undecodable,
        K::PermissionDenied => Cause::StoreDenied,
        // As in a store's own write (`generic_cause`): an fsync of `sync_local_files` is where
        // a full disk or an exhausted quota often shows first (NFS, btrfs).
        k if io_refused(k) => Cause::StoreRefused,
        _ => Cause::StoreUnavailable,
    }
}

/// I/O errors of a network connection (refused, reset, timed out, ...): the data never arrived.
fn io_network(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        kind,
        K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::NotConnected
            | K::BrokenPipe
            | K::TimedOut
            | K::Interrupted
            | K::WouldBlock
            | K::AddrInUse
            | K::AddrNotAvailable
            | K::NetworkDown
            | K::NetworkUnreachable
            | K::HostUnreachable
    )
}

/// I/O errors that say the store can never take the request as it is (a full or read-only
/// disk, an exhausted quota, a path that cannot be a file): no retry helps.
pub(crate) fn io_refused(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        kind,
        K::NotADirectory
            | K::IsADirectory
            | K::StorageFull
            | K::ReadOnlyFilesystem
            | K::FileTooLarge
            | K::InvalidFilename
            | K::QuotaExceeded
    )
}

/// The cause of an SQL catalog (sqlx) error in a source chain, if `err` is one.
#[cfg(feature = "sql")]
fn sql_cause_of(err: &(dyn StdError + 'static)) -> Option<Cause> {
    err.downcast_ref::<sqlx::Error>().map(sqlx_cause)
}

/// No SQL catalog in this build (feature `sql` off).
#[cfg(not(feature = "sql"))]
fn sql_cause_of(_err: &(dyn StdError + 'static)) -> Option<Cause> {
    None
}

#[cfg(feature = "sql")]
fn sqlx_cause(e: &sqlx::Error) -> Cause {
    use sqlx::Error as E;
    match e {
        E::Io(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed | E::Tls(_) | E::Protocol(_) => {
            Cause::CatalogUnavailable
        }
        E::Database(db) => {
            // SQLITE_BUSY (5) / SQLITE_LOCKED (6), including extended codes, and SQLITE_IOERR
            // (10: a read or write of the catalog file failed, as on a network file system that
            // hiccups; the same errno from the object store is `Unavailable` too). A write whose
            // COMMIT failed that way is an unknown outcome: `swap_failure` decides that first.
            let code = db.code().and_then(|c| c.parse::<i32>().ok()).map(|c| c & 0xff);
            // SQLITE_PROTOCOL (15): a WAL lock race that SQLite gave up retrying, busy as in
            // the hot stores.
            let busy = matches!(code, Some(5 | 6 | 10 | 15));
            // SQLITE_CORRUPT (11) / SQLITE_NOTADB (26): the catalog file is damaged or another file.
            if matches!(code, Some(11 | 26)) {
                Cause::Undecodable
            } else if busy {
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

/// `msg` with every one of `secrets` in it replaced by `<redacted>`.
pub(crate) fn redact(msg: &str, secrets: &[String]) -> String {
    secrets.iter().fold(msg.to_string(), |m, s| m.replace(s.as_str(), "<redacted>"))
}

/// The message of a REST catalog call refused because its OAuth token expired, after the
/// token was renewed: nothing was applied, and a retry carries the new token.
pub(crate) const TOKEN_RENEWED: &str = "the REST catalog refused an expired token; a new one was obtained, retry";

/// Whether a REST catalog answered `e` because it refused the request's token: 401
/// Unauthorized, or 419 (the REST spec's "authentication timeout"), as an Iceberg error model
/// or as a bare status.
#[cfg(feature = "rest")]
pub(crate) fn token_refused(e: &iceberg::Error) -> bool {
    let shown = e.to_string();
    let status = error_model_code(&shown).or_else(|| rest_status(&shown, "status"));
    matches!(status, Some(401 | 419))
}

/// Whether a catalog refused `e`'s request before applying anything: a table that is not there,
/// or a REST catalog's 3xx or 4xx answer (the REST protocol's 4xx are refusals; a 409 conflict
/// is mapped by iceberg-catalog-rest itself; only a 5xx or a broken connection leaves a
/// commit's outcome unknown).
pub(crate) fn refused_unapplied(e: &iceberg::Error) -> bool {
    e.kind() == iceberg::ErrorKind::TableNotFound
        || (e.kind() == iceberg::ErrorKind::Unexpected
            && e.message() == "Received response with unexpected status code"
            && matches!(rest_status(&e.to_string(), "status"), Some(300..=499)))
}

fn iceberg_cause(e: &iceberg::Error) -> Cause {
    use iceberg::ErrorKind as K;
    if e.kind() == K::Unexpected && e.message() == TOKEN_RENEWED {
        return Cause::StoreUnavailable;
    }
    if e.kind() == K::Unexpected {
        // iceberg wraps every `reqwest` failure of a REST catalog so: a refused connection, a
        // timeout, a body cut short (the connection broke), or a request that could not be
        // built (a bad URI or header: configuration).
        if e.message() == "Failed to execute http request" {
            let built = StdError::source(e).is_some_and(|s| s.to_string().starts_with("builder error"));
            // Or the TLS client refused the server (a certificate it does not accept, a server
            // that speaks no TLS), as for the object store: no retry is accepted (it was
            // `Unavailable`, and the store's open was retried for good).
            // Only while connecting: a TLS record the client finds corrupt on a connection
            // already in use (a proxy's plain-text answer after the request went out) broke a
            // request that may have been taken, as any broken connection does (it read as
            // configuration, and a refused append deleted the files of a commit that may land).
            let refused = refused_while_connecting(e, &chain_text(e));
            return if built || refused { Cause::Config } else { Cause::StoreUnavailable };
        }
        // iceberg-catalog-rest: a commit answered 500/502/504, or any request answered with a
        // status it does not map (429 and 5xx are the server's or a proxy's trouble, and
        // transient).
        if e.message().contains("commit state is unknown") {
            return Cause::OutcomeUnknown;
        }
        if e.message() == "Received response with unexpected status code" {
            match rest_status(&e.to_string(), "status") {
                Some(408 | 429 | 500 | 502..=599) => return Cause::StoreUnavailable,
                // A redirect the client did not follow (only 307 and 308 are): the catalog's
                // URI is not where it serves.
                Some(300..=399) => return Cause::Config,
                _ => {}
            }
        }
        // The OAuth token endpoint answered something other than 200, in a body that is not
        // an Iceberg error (an HTML or empty 5xx, an RFC 6749 `{"error": "invalid_client"}`).
        if e.message() == "Received unexpected response" {
            return token_endpoint_cause(rest_status(&e.to_string(), "code"));
        }
        // A 200 answer (of the token endpoint or the catalog) that is not what was asked for: a
        // proxy's page, a server speaking another protocol. Not a damaged file of the table.
        if e.message().starts_with("Failed to parse response from rest catalog server") {
            return Cause::StoreRefused;
        }
    }
    if e.kind() == K::DataInvalid {
        // A `header.*` property that is no HTTP header (caught at open, see `catalog::open`).
        if quoted_header(e).is_some() {
            return Cause::Config;
        }
        // The token endpoint issued a token that cannot be sent in a header.
        if e.message() == "Invalid token received from catalog server!" {
            return Cause::StoreRefused;
        }
        // The token endpoint answered an Iceberg error (iceberg-catalog-rest turns one into
        // `DataInvalid` with its `type` and `code`, and no source).
        if StdError::source(e).is_none() {
            if let Some(code) = error_model_code(&e.to_string()) {
                return token_endpoint_cause(Some(code));
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

/// The HTTP status iceberg-catalog-rest puts first in an error's context (`status` for a
/// catalog's answer, `code` for the OAuth token endpoint's), as in
/// `Unexpected, context: { code: 503 Service Unavailable, … } => …`.
fn rest_status(shown: &str, key: &str) -> Option<u16> {
    let value = shown.split_once(", context: { ")?.1.strip_prefix(key)?.strip_prefix(": ")?;
    value.get(..3)?.parse().ok()
}

/// The `code` of an Iceberg error model the token endpoint answered, as iceberg-catalog-rest
/// shows it: `DataInvalid, context: { type: …, code: 503 } => …`.
fn error_model_code(shown: &str) -> Option<u16> {
    let context = shown.strip_prefix("DataInvalid, context: { type: ")?;
    context.split_once(", code: ")?.1.get(..3)?.parse().ok()
}

/// What a status of the REST catalog's OAuth token endpoint means: the server or a proxy is
/// overloaded or down (transient; 501, "not implemented", is not), the credential was refused (RFC 6749 answers 400 or 401;
/// retrying the same one cannot help), the endpoint is not where it was configured, or
/// something else the endpoint will not do.
fn token_endpoint_cause(status: Option<u16>) -> Cause {
    match status {
        Some(408 | 429 | 500 | 502..=599) => Cause::StoreUnavailable,
        Some(400 | 401 | 403) => Cause::StoreDenied,
        Some(300..=399 | 404 | 405) => Cause::Config,
        _ => Cause::StoreRefused,
    }
}

/// Whether iceberg-catalog-rest refused a header it quotes in its message ("Invalid header
/// value: …"): `"name"` or `"value"`.
fn quoted_header(e: &iceberg::Error) -> Option<&'static str> {
    if e.message().starts_with("Invalid header value: ") {
        Some("value")
    } else if e.message().starts_with("Invalid header name: ") {
        Some("name")
    } else {
        None
    }
}

/// The message of a REST catalog error whose context holds a response body that may carry
/// secrets: an answer iceberg-catalog-rest could not parse (a token endpoint's 200 may hold an
/// access token, a table's load result vended storage credentials) or any answer of the OAuth
/// token endpoint. It keeps the error's kind, message and status, and leaves the body and the
/// source (a JSON error may quote a value) out. `None` for every other error.
fn rest_message_without_body(e: &iceberg::Error) -> Option<String> {
    // A header value (a `header.*` property the server sent in its config overrides) may be a
    // secret: iceberg-catalog-rest quotes it in its message.
    if let Some(what) = quoted_header(e) {
        return Some(format!(
            "{}: the REST catalog's configuration holds an invalid header {what} (not shown)",
            e.kind()
        ));
    }
    let shown = e.to_string();
    let unparsed = e.message().starts_with("Failed to parse response from rest catalog server");
    let auth = e.message() == "Received unexpected response" || (unparsed && shown.contains("operation: auth"));
    if !auth && !unparsed {
        return None;
    }
    let status = rest_status(&shown, "code").map(|s| format!(" (HTTP {s})")).unwrap_or_default();
    let from = if auth { "the REST catalog's OAuth token endpoint" } else { "the REST catalog" };
    Some(format!(
        "{}: {from}: {}{status}; the response body is not shown (it may hold credentials)",
        e.kind(),
        e.message()
    ))
}

/// The most specific cause in the chain of `e`.
pub(crate) fn cause_of(e: &(dyn StdError + 'static)) -> Cause {
    let mut best = Cause::Other;
    // Below a failed transport (an object-store or catalog-database error other than "not
    // found"), an I/O or decoding error is how the connection broke (a peer closing early is an
    // `UnexpectedEof`), not damage in a file: the data never arrived.
    let mut in_transport = false;
    // Below a decoder's error (a file's bytes read whole, then failing to decode), an I/O error
    // that is not the network's is the decoder's own (zstd's "Data corruption detected" under
    // apache-avro, as `Other`): damage in the file, not an outage.
    let mut in_decoder = false;
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        let c = if let Some(os) = err.downcast_ref::<object_store::Error>() {
            let c = object_store_cause(os);
            // A store's error starts a context of its own (not a decoder's).
            in_decoder = false;
            // A `Generic` error was classified whole (its sources included) by `generic_cause`.
            in_transport |= c == Cause::StoreUnavailable || matches!(os, object_store::Error::Generic { .. });
            c
        } else if in_transport {
            Cause::Other
        } else if let Some(io) = err.downcast_ref::<std::io::Error>() {
            match io_cause(io) {
                Cause::StoreUnavailable if in_decoder && !io_network(io.kind()) => Cause::Undecodable,
                c => c,
            }
        } else if let Some(c) = sql_cause_of(err) {
            in_decoder = false;
            in_transport |= c == Cause::CatalogUnavailable;
            c
        } else if let Some(pe) = err.downcast_ref::<parquet::errors::ParquetError>() {
            // A decoder's own error, unless it only passes on another one (a failed write of
            // the file being encoded arrives as `External`: an I/O failure, not damage).
            in_decoder = !matches!(pe, parquet::errors::ParquetError::External(_));
            Cause::Undecodable
        } else if let Some(ae) = err.downcast_ref::<arrow_schema::ArrowError>() {
            use arrow_schema::ArrowError as A;
            in_decoder = !matches!(ae, A::ExternalError(_) | A::IoError(..));
            Cause::Undecodable
        } else if err.downcast_ref::<serde_json::Error>().is_some() {
            in_decoder = true;
            Cause::Undecodable
        } else if let Some(ib) = err
            .downcast_ref::<iceberg::Error>()
            // iceberg's object cache hands its loads' errors on shared (a manifest or manifest
            // list read by a scan's planning): the `Arc`'s own `source` is the inner error's,
            // so the inner error is seen here or never.
            .or_else(|| err.downcast_ref::<std::sync::Arc<iceberg::Error>>().map(|a| &**a))
        {
            let c = iceberg_cause(ib);
            // Only below iceberg's "invalid data" (a file it read and could not decode): an
            // iceberg error of another kind starts a context of its own (a write, a request).
            in_decoder = c == Cause::DataInvalid;
            // Below a broken REST connection, an I/O error is how it broke (a body cut short);
            // below a request that could not be built, or an answer iceberg classed by its
            // status or could not parse, nothing more is to be learned (the JSON error of an
            // HTML page is no damaged file).
            in_transport |=
                matches!(c, Cause::StoreUnavailable | Cause::Config | Cause::StoreDenied | Cause::StoreRefused);
            c
        } else if let Some(d) = err.downcast_ref::<Error>() {
            // dotdo's own errors raised inside an iceberg call (the SQL catalog pointer swap, a
            // location the storage cannot map, a failed write or fsync of the storage).
            in_decoder = false;
            match d.kind() {
                ErrorKind::Unavailable => Cause::CatalogUnavailable,
                ErrorKind::AmbiguousOutcome => Cause::OutcomeUnknown,
                ErrorKind::Conflict => Cause::CommitConflict,
                ErrorKind::InvalidInput => Cause::Config,
                ErrorKind::Corrupt => Cause::Undecodable,
                _ => Cause::Other,
            }
        } else {
            Cause::Other
        };
        // A deeper, more specific cause wins over a generic wrapper; a missing file keeps the
        // path its store error named over a deeper I/O "not found" that names none.
        let keeps_path = matches!(&best, Cause::Missing(p) if !p.is_empty()) && c == Cause::Missing(String::new());
        if c != Cause::Other && !keeps_path {
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
        Cause::StoreRefused => {
            Error::new(ErrorKind::Backend, format!("{what}: the store refused the request: {message}"))
                .with_retryable(false)
        }
        Cause::Config => Error::invalid(format!("{what}: configuration: {message}")),
        Cause::Undecodable | Cause::DataInvalid => Error::corrupt(format!("{what}: cannot decode: {message}")),
        Cause::CommitConflict => Error::new(ErrorKind::Conflict, format!("{what}: commit conflict: {message}")),
        Cause::TableMissing => Error::new(ErrorKind::NotFound, format!("{what}: {message}")),
        Cause::OutcomeUnknown => Error::new(ErrorKind::AmbiguousOutcome, format!("{what}: {message}")),
        Cause::Other => Error::backend(format!("{what}: {message}")),
    }
}

/// [`classify`] for a failure while writing data files: a Parquet or Arrow error there is the
/// writer's refusal, not damaged data (what `classify` makes of those errors on reads), so it is
/// `Backend`.
pub(crate) fn classify_write(e: iceberg::Error, what: &str) -> Error {
    let err = classify(e, what);
    if err.kind() == &ErrorKind::Corrupt {
        Error::backend(format!("{what}: writing a data file failed: {err}")).with_source(err)
    } else {
        err
    }
}

/// Classify an iceberg error raised while doing `what` (which should name the file or table).
pub(crate) fn classify(e: iceberg::Error, what: &str) -> Error {
    let cause = cause_of(&e);
    if let Some(msg) = rest_message_without_body(&e) {
        // Not kept as the source either: its `Debug` prints the body.
        return to_error(cause, what, msg);
    }
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

/// Classify an iceberg error raised while decoding a metadata file that was read (a manifest or
/// manifest list, named by `what`): a failure with no more specific cause (iceberg reports a bad
/// bound or an unknown field as `Unexpected`) is the file's damage, `Corrupt`, not a backend bug.
pub(crate) fn classify_metadata_read(e: iceberg::Error, what: &str) -> Error {
    let cause = match cause_of(&e) {
        // Not a feature iceberg lacks (`FeatureUnsupported`) or a failed precondition: those
        // stay what they are.
        Cause::Other if matches!(e.kind(), iceberg::ErrorKind::Unexpected | iceberg::ErrorKind::DataInvalid) => {
            Cause::Undecodable
        }
        c => c,
    };
    let msg = e.to_string();
    to_error(cause, what, msg).with_source(e)
}

/// `fut`, a read of the metadata file `what` names (a manifest list or manifest), its error
/// classified by [`classify_metadata_read`]; a panic inside it (apache-avro 0.21 unwraps the
/// result of parsing a damaged file's embedded schema names) is `Corrupt` naming the file.
pub(crate) async fn read_metadata_file<T>(
    what: &str,
    fut: impl std::future::Future<Output = iceberg::Result<T>>,
) -> dotdo_core::Result<T> {
    panic_is_corrupt(what, async { fut.await.map_err(|e| classify_metadata_read(e, what)) }).await
}

/// `fut`, a decode of the file `what` names, with a panic inside it turned into `Corrupt` naming
/// the file: parquet 58 asserts on some damaged bytes (a bit width past its type's, in
/// `bit_util`), and a damaged file must not take its reader down.
pub(crate) async fn panic_is_corrupt<T>(
    what: &str,
    fut: impl std::future::Future<Output = dotdo_core::Result<T>>,
) -> dotdo_core::Result<T> {
    catching(fut, || what.to_string()).await?
}

/// [`panic_is_corrupt`] for a commit through iceberg's `Transaction` on top of `table`'s head
/// (it reads the head's manifest list): the panic is an iceberg error whose source is the
/// `Corrupt` error naming that list, which [`classify`] keeps.
pub(crate) async fn iceberg_panic_is_corrupt<T>(
    table: &iceberg::table::Table,
    fut: impl std::future::Future<Output = iceberg::Result<T>>,
) -> iceberg::Result<T> {
    iceberg_catching(fut, || format!("{}, read by iceberg's commit", head_metadata_files(table))).await
}

/// `fut` (an iceberg call), a panic inside it an iceberg `DataInvalid` error whose source is
/// the `Corrupt` error of [`panicked`] naming `what()`, which [`classify`] keeps.
pub(crate) async fn iceberg_catching<T>(
    fut: impl std::future::Future<Output = iceberg::Result<T>>,
    what: impl FnOnce() -> String,
) -> iceberg::Result<T> {
    catching(fut, what)
        .await
        .unwrap_or_else(|e| Err(iceberg::Error::new(iceberg::ErrorKind::DataInvalid, e.to_string()).with_source(e)))
}

/// `catalog.load_table(ident)`, a panic while loading (iceberg-rust 0.10.1 subtracts the
/// metadata log's timestamps unchecked as it normalizes a loaded file: a damaged or foreign
/// metadata file panicked a debug build) `Corrupt` naming the table's metadata.
pub(crate) async fn load_table(
    catalog: &dyn iceberg::Catalog,
    ident: &iceberg::TableIdent,
) -> iceberg::Result<iceberg::table::Table> {
    iceberg_catching(catalog.load_table(ident), || format!("the current metadata file of table {ident}")).await
}

/// `fut`, with a panic inside it caught: the `Corrupt` error of [`panicked`] naming `what()`
/// (built only then).
async fn catching<R>(
    fut: impl std::future::Future<Output = R>,
    what: impl FnOnce() -> String,
) -> dotdo_core::Result<R> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(fut).catch_unwind().await.map_err(|p| panicked(&what(), p.as_ref()))
}

/// The metadata files a read of `table`'s head decodes: its manifest list and manifests.
pub(crate) fn head_metadata_files(table: &iceberg::table::Table) -> String {
    match table.metadata().current_snapshot() {
        Some(s) => format!("manifest list {} (or a manifest it lists)", s.manifest_list()),
        None => format!("a metadata file of table {}", table.identifier()),
    }
}

/// The `Corrupt` error of a decode of `what` that panicked with `payload`.
pub(crate) fn panicked(what: &str, payload: &(dyn std::any::Any + Send)) -> Error {
    let msg = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    Error::corrupt(format!("{what}: decoding it panicked ({msg}); the file is damaged"))
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

    /// A manifest iceberg cannot decode (a bound cut inside a UTF-8 character by another
    /// engine's writer: `Unexpected`) is `Corrupt` naming it; a store outage while reading it
    /// stays `Unavailable`.
    #[test]
    fn an_undecodable_manifest_is_corrupt_and_an_outage_is_not() {
        let bad = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "invalid utf-8 sequence in a bound");
        let e = classify_metadata_read(bad, "manifest s3://b/t/metadata/m1.avro");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("m1.avro"), "{e}");
        let e = classify_metadata_read(
            iceberg::Error::new(iceberg::ErrorKind::FeatureUnsupported, "a v3 manifest"),
            "manifest m1.avro",
        );
        assert_ne!(e.kind(), &ErrorKind::Corrupt, "a feature iceberg lacks is not damage: {e}");
        let e = classify_metadata_read(wrapped(os_generic()), "manifest m1.avro");
        assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
        assert!(e.is_retryable());
    }

    /// A certificate the TLS client refuses (rustls's error, under reqwest's and hyper's) is a
    /// configuration error, not retryable.
    #[test]
    fn a_refused_certificate_is_not_retryable() {
        for cause in ["invalid peer certificate: UnknownIssuer", "invalid peer certificate: NotValidForName"] {
            let tls = object_store::Error::Generic {
                store: "S3",
                source: Box::new(std::io::Error::new(std::io::ErrorKind::InvalidData, cause)),
            };
            let e = classify(wrapped(tls), "table t");
            assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{cause}: {e}");
            assert!(!e.is_retryable(), "{e}");
        }
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
        // 501: the server will never do it; a status quoted in a body is no status.
        assert_eq!(classify(status("501 Not Implemented"), "catalog").kind(), &ErrorKind::Backend);
        let quoted = status("400 Bad Request").with_context("json", "{\"status: 503\"}");
        assert_eq!(classify(quoted, "catalog").kind(), &ErrorKind::Backend);
    }

    /// The OAuth token endpoint's answers, built as iceberg-catalog-rest builds them: busy or
    /// down is `Unavailable`, a refused credential or a bad token `Backend` (no retry mends
    /// them), a wrong endpoint `InvalidInput`; none is `Corrupt`, and no response body (which may
    /// hold a token) reaches the message or the source.
    #[test]
    fn rest_token_endpoint_answers() {
        let unexpected = |code: &str, body: &str| {
            let parsed = serde_json::from_str::<std::collections::HashMap<String, u8>>(body);
            iceberg::Error::new(iceberg::ErrorKind::Unexpected, "Received unexpected response")
                .with_context("code", code.to_string())
                .with_context("operation", "auth")
                .with_context("url", "http://catalog/v1/oauth/tokens")
                .with_context("json", body.to_string())
                .with_source(parsed.expect_err("not an Iceberg error model"))
        };
        let cases = [
            ("503 Service Unavailable", "<html>busy s3cr3t</html>", ErrorKind::Unavailable),
            ("429 Too Many Requests", "", ErrorKind::Unavailable),
            ("401 Unauthorized", r#"{"error":"invalid_client s3cr3t"}"#, ErrorKind::Backend),
            ("400 Bad Request", r#"{"error":"invalid_grant"}"#, ErrorKind::Backend),
            ("404 Not Found", "<html>no s3cr3t</html>", ErrorKind::InvalidInput),
            ("501 Not Implemented", "", ErrorKind::Backend),
        ];
        for (code, body, kind) in cases {
            let e = classify(unexpected(code, body), "table ns.t");
            assert_eq!(e.kind(), &kind, "{code}: {e}");
            assert_eq!(e.is_retryable(), kind == ErrorKind::Unavailable, "{code}: {e}");
            assert!(e.message().contains(&code[..3]), "the status is named: {e}");
            assert!(!format!("{e} {e:?}").contains("s3cr3t"), "{code}: the body leaked: {e:?}");
        }
        // An Iceberg error model from the token endpoint (no source, `type` and `code`).
        let model = |code: &str| {
            iceberg::Error::new(iceberg::ErrorKind::DataInvalid, "service is down")
                .with_context("type", "ServiceUnavailableException")
                .with_context("code", code.to_string())
        };
        assert_eq!(classify(model("503"), "t").kind(), &ErrorKind::Unavailable);
        assert_eq!(classify(model("401"), "t").kind(), &ErrorKind::Backend);
        // A 200 whose body is no token answer; the body holds one.
        let body = r#"{"access_token":"s3cr3t"}"#;
        let garbled =
            iceberg::Error::new(iceberg::ErrorKind::Unexpected, "Failed to parse response from rest catalog server!")
                .with_context("operation", "auth")
                .with_context("json", body)
                .with_source(serde_json::from_str::<std::collections::HashMap<String, u8>>(body).expect_err("no u8"));
        let e = classify(garbled, "t");
        assert_eq!(e.kind(), &ErrorKind::Backend, "{e}");
        assert!(!format!("{e} {e:?}").contains("s3cr3t"), "{e:?}");
        // A table's load result that does not parse may hold vended credentials.
        let body = r#"{"config":{"s3.secret-access-key":"s3cr3t"}}"#;
        let garbled =
            iceberg::Error::new(iceberg::ErrorKind::Unexpected, "Failed to parse response from rest catalog server")
                .with_context("json", body)
                .with_source(serde_json::from_str::<u8>(body).expect_err("no u8"));
        let e = classify(garbled, "t");
        assert_eq!(e.kind(), &ErrorKind::Backend, "{e}");
        assert!(!format!("{e} {e:?}").contains("s3cr3t"), "{e:?}");
        // A token the server issued that no header can carry.
        let bad = "a\nb".parse::<http::HeaderValue>().expect_err("not a header value");
        let token = iceberg::Error::new(iceberg::ErrorKind::DataInvalid, "Invalid token received from catalog server!")
            .with_source(bad);
        assert_eq!(classify(token, "t").kind(), &ErrorKind::Backend);
        // A header value the server sent in its config overrides, quoted by iceberg.
        let bad = "a\nb".parse::<http::HeaderValue>().expect_err("not a header value");
        let header =
            iceberg::Error::new(iceberg::ErrorKind::DataInvalid, "Invalid header value: s3cr3t\n").with_source(bad);
        let e = classify(header, "t");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
        assert!(!format!("{e} {e:?}").contains("s3cr3t"), "{e:?}");
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

    #[cfg(feature = "sql")]
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

    #[tokio::test]
    async fn a_file_shorter_than_its_metadata_says_is_corrupt() {
        use object_store::ObjectStore;
        let key = object_store::path::Path::from("wh/t/data/x.parquet");
        let mem = object_store::memory::InMemory::new();
        mem.put(&key, bytes::Bytes::new().into()).await.expect("put");
        let e = classify_object_store(mem.get_range(&key, 0..10).await.expect_err("past the end"));
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        let dir = tempfile::tempdir().expect("tempdir");
        let local = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).expect("local");
        local.put(&key, bytes::Bytes::new().into()).await.expect("put");
        let e = classify_object_store(local.get_range(&key, 0..10).await.expect_err("past the end"));
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        assert!(!e.is_retryable());
    }

    #[tokio::test]
    async fn a_request_that_can_never_succeed_is_not_retryable() {
        use object_store::ObjectStore;
        let dir = tempfile::tempdir().expect("tempdir");
        let local = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).expect("local");
        local.put(&"f".into(), bytes::Bytes::from_static(b"x").into()).await.expect("put");
        let e = local.put(&"f/under-a-file".into(), bytes::Bytes::from_static(b"y").into()).await;
        let e = classify_object_store(e.expect_err("a path through a file"));
        assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Backend, false), "{e}");
        // HTTP stores: object_store's retry error text, status and all.
        let http = |status: &str| object_store::Error::Generic {
            store: "S3",
            source: Box::new(std::io::Error::other(format!(
                "Error performing PUT http://localhost/b/k in 2ms - Server returned non-2xx status code: {status}: "
            ))),
        };
        let e = classify_object_store(http("400 Bad Request"));
        assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Backend, false), "{e}");
        let slow = http("400 Bad Request: <Error><Code>RequestTimeout</Code></Error>");
        assert_eq!(classify_object_store(slow).kind(), &ErrorKind::Unavailable, "S3's RequestTimeout");
        // The words in a path of the request (a table named so) are no such answer.
        let named = object_store::Error::Generic {
            store: "S3",
            source: Box::new(std::io::Error::other(
                "Error performing PUT http://localhost/b/RequestTimeout/k in 2ms - Server returned non-2xx status \
                 code: 400 Bad Request: <Error><Code>InvalidArgument</Code></Error>",
            )),
        };
        let e = classify_object_store(named);
        assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Backend, false), "{e}");
        let short = classify_object_store(http("416 Range Not Satisfiable: <Code>InvalidRange</Code>"));
        assert_eq!(short.kind(), &ErrorKind::Corrupt, "a range past the end: the file is short: {short}");
        for transient in ["503 Service Unavailable", "429 Too Many Requests", "408 Request Timeout"] {
            let e = classify_object_store(http(transient));
            assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Unavailable, true), "{transient}: {e}");
        }
        // A redirect object_store did not follow: configuration, not an outage.
        assert_eq!(classify_object_store(http("301 Moved Permanently")).kind(), &ErrorKind::InvalidInput);
        // An operation the store does not implement: no retry makes it one (other 5xx are
        // the server's passing trouble).
        for never in ["501 Not Implemented", "505 HTTP Version Not Supported"] {
            let e = classify_object_store(http(never));
            assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Backend, false), "{never}: {e}");
        }
    }

    /// An `http://` endpoint without `allow_http`: the HTTP client refuses to build the request,
    /// which no retry changes (it was a retryable Unavailable).
    #[tokio::test]
    async fn a_request_the_client_refuses_to_build_is_a_configuration_error() {
        use object_store::ObjectStore;
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name("b")
            .with_region("us-east-1")
            .with_endpoint("http://127.0.0.1:9")
            .with_access_key_id("k")
            .with_secret_access_key("s")
            .build()
            .expect("s3");
        let e = s3.put(&"k".into(), bytes::Bytes::from_static(b"x").into()).await.expect_err("http not allowed");
        let e = classify_object_store(e);
        assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::InvalidInput, false), "{e}");
    }

    /// A full disk or an exhausted quota met at the fsync of `sync_local_files` (a bare I/O
    /// error under iceberg's) is `Backend`, not retryable, as in a store's own write (it was a
    /// retryable Unavailable); a range read the store answers whole or refuses as empty is
    /// `Corrupt` (damaged footer ranges), not retried.
    #[test]
    fn a_full_disk_at_fsync_and_unservable_ranges_are_not_retried() {
        for kind in [std::io::ErrorKind::StorageFull, std::io::ErrorKind::QuotaExceeded] {
            let e = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "cannot fsync /wh/t/data/f.parquet")
                .with_source(std::io::Error::from(kind));
            let e = classify(e, "writing");
            assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Backend, false), "{kind:?}: {e}");
        }
        for text in ["Received non-partial response when range requested", "Range started at 10 and ended at 10"] {
            let e = object_store::Error::Generic { store: "S3", source: text.into() };
            let e = classify_object_store(e);
            assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Corrupt, false), "{text}: {e}");
        }
    }

    /// A local file or directory the process may not write is for the operator (it was a
    /// retryable Unavailable): `Backend`, not retryable. (Built as object_store's local store
    /// reports it: tests may run as root, where permissions are not enforced.)
    #[test]
    fn a_local_permission_error_is_not_retryable() {
        for kind in [std::io::ErrorKind::PermissionDenied, std::io::ErrorKind::QuotaExceeded] {
            let e = object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(std::io::Error::new(kind, "Unable to open file /wh/t/data/f.parquet")),
            };
            let e = classify_object_store(e);
            assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Backend, false), "{kind:?}: {e}");
        }
    }

    /// A missing bucket (the store's answer says so in its error code) is configuration; a
    /// missing file whose path merely holds those words is a missing file (`Corrupt`).
    #[test]
    fn a_missing_bucket_is_told_by_its_error_code_not_by_a_path() {
        let io = |m: &str| -> Box<dyn StdError + Send + Sync> {
            Box::new(std::io::Error::new(std::io::ErrorKind::NotFound, m.to_string()))
        };
        let named = object_store::Error::NotFound {
            path: "wh/NoSuchBucket/ContainerNotFound/data/x.parquet".into(),
            source: io("Client error with status 404 Not Found for url (http://s3/bkt/wh/NoSuchBucket/ContainerNotFound/data/x.parquet): <Error><Code>NoSuchKey</Code></Error>"),
        };
        assert_eq!(
            object_store_cause(&named),
            Cause::Missing("wh/NoSuchBucket/ContainerNotFound/data/x.parquet".into())
        );
        let bucket = object_store::Error::NotFound {
            path: "wh/t/data/x.parquet".into(),
            source: io("Client error with status 404 Not Found: <Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>"),
        };
        assert_eq!(object_store_cause(&bucket), Cause::Config);
        let container = object_store::Error::NotFound {
            path: "wh/t/data/x.parquet".into(),
            source: io("Client error with status 404 Not Found: <Error><Code>ContainerNotFound</Code></Error>"),
        };
        assert_eq!(object_store_cause(&container), Cause::Config);
    }

    /// A manifest whose zstd-compressed Avro block is damaged: apache-avro passes on zstd's
    /// `io::Error` of kind `Other` ("Data corruption detected") under iceberg's `DataInvalid`.
    /// `Corrupt` naming the file (it was a retryable `Unavailable`: "store unavailable", retried
    /// for good). A network failure under a decoder's error stays an outage.
    #[test]
    fn a_decoders_own_io_error_is_damage_not_an_outage() {
        let damaged = iceberg::Error::new(iceberg::ErrorKind::DataInvalid, "Failure in conversion with avro")
            .with_source(std::io::Error::other("Data corruption detected"));
        let e = classify_metadata_read(damaged, "manifest s3://b/t/metadata/m.avro");
        assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Corrupt, false), "{e}");
        assert!(e.to_string().contains("m.avro"), "names the file: {e}");
        let reset = iceberg::Error::new(iceberg::ErrorKind::DataInvalid, "Failure in conversion with avro")
            .with_source(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer"));
        let e = classify_metadata_read(reset, "manifest s3://b/t/metadata/m.avro");
        assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Unavailable, true), "{e}");
        // A failed write (or fsync) of a data file passes through parquet's writer as
        // `External`: an I/O failure of the store, retryable, not damage.
        // (The chain `storage.rs` and iceberg's writer build: iceberg's error over parquet's
        // `External` over iceberg's "cannot fsync" over the OS error.)
        let fsync = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "cannot fsync data file of wh/t/x.parquet")
            .with_source(std::io::Error::from_raw_os_error(5)); // EIO
        let write = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "Failed to finish parquet writer.")
            .with_source(parquet::errors::ParquetError::External(Box::new(fsync)));
        let e = classify(write, "writing a data file");
        assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Unavailable, true), "{e}");
        let direct = parquet::errors::ParquetError::External(Box::new(std::io::Error::from_raw_os_error(5)));
        assert_eq!(cause_of(&direct), Cause::StoreUnavailable);
    }

    /// The same damage read through iceberg's object cache (a scan's planning loads manifests
    /// there, and hands their errors on shared, in an `Arc`, whose `source` skips the inner
    /// error): `Corrupt`, as read directly. (It was a retryable `Unavailable`: the decoder's
    /// error was never seen, and the zstd error under it read as an outage.)
    #[test]
    fn a_damaged_manifest_read_through_icebergs_object_cache_is_corrupt() {
        let inner = iceberg::Error::new(iceberg::ErrorKind::DataInvalid, "Failure in conversion with avro")
            .with_source(std::io::Error::other("Data corruption detected"));
        let e = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "Failed to load manifest s3://b/t/metadata/m.avro")
            .with_source(std::sync::Arc::new(inner));
        let e = classify_metadata_read(e, "scanning ns.t");
        assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Corrupt, false), "{e}");
        assert!(e.to_string().contains("m.avro"), "names the file: {e}");
    }

    #[test]
    fn a_rest_catalog_connection_cut_short_is_unavailable() {
        let cut = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "Failed to execute http request")
            .with_source(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "body ended early"));
        let e = classify(cut, "loading table ns.t");
        assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Unavailable, true), "{e}");
        // reqwest's text for a request that could not be built (a REST URI without a scheme).
        let bad = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "Failed to execute http request")
            .with_source(std::io::Error::other("builder error: relative URL without a base"));
        assert_eq!(classify(bad, "opening REST catalog").kind(), &ErrorKind::InvalidInput);
        // The TLS client refusing the server, under hyper's I/O error: configuration.
        for tls in ["invalid peer certificate: UnknownIssuer", "received corrupt message of type InvalidContentType"] {
            let refused = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "Failed to execute http request")
                .with_source(std::io::Error::new(std::io::ErrorKind::InvalidData, tls));
            let e = classify(refused, "opening REST catalog");
            assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::InvalidInput, false), "{tls}: {e}");
        }
    }

    /// A TLS error on a connection already in use (the request body, here, failing with the
    /// TLS client's text mid-send: a real `reqwest` error that is not the connector's) is an
    /// outage that may have taken the request, not configuration; refused while connecting (a
    /// plain-text server answering a TLS handshake) it stays configuration.
    #[cfg(feature = "rest")]
    #[tokio::test]
    async fn a_tls_error_after_connecting_is_an_outage_not_configuration() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    // Plain text to whatever comes (to a TLS client: a corrupt record).
                    let mut buf = [0u8; 1024];
                    if matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {
                        let _ = socket.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
                    }
                    while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        let tls = "received corrupt message of type InvalidContentType";
        let broken = || async {
            let body = futures::stream::iter([Err::<bytes::Bytes, _>(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                tls,
            ))]);
            reqwest::Client::new()
                .post(format!("http://{addr}/v1/namespaces/ns/tables/t"))
                .body(reqwest::Body::wrap_stream(body))
                .send()
                .await
                .expect_err("the body failed")
        };
        let sent = broken().await;
        assert!(!sent.is_connect());
        // The same under an object store's request (a data file's PUT): an outage too.
        let put = object_store::Error::Generic { store: "S3", source: Box::new(broken().await) };
        let e = classify_object_store(put);
        assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Unavailable, true), "{e}");
        let e = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "Failed to execute http request").with_source(sent);
        assert!(chain_text(&e).contains(tls), "{e}");
        let e = classify(e, "committing to ns.t");
        assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::Unavailable, true), "{e}");
        // A plain-text server answering the handshake: refused while connecting.
        let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30)).build().expect("client");
        let handshake = client.get(format!("https://{addr}/v1/config")).send().await.expect_err("no TLS server");
        assert!(handshake.is_connect(), "{handshake:?}");
        let e = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "Failed to execute http request")
            .with_source(handshake);
        assert!(tls_refused(&chain_text(&e)), "{e}");
        assert_eq!(classify(e, "opening REST catalog").kind(), &ErrorKind::InvalidInput);
    }

    /// `EPERM` is a local file's permission (for the operator) only on the local store; from
    /// a network store's connection it is an outage (retryable).
    #[test]
    fn a_network_stores_permission_error_is_an_outage() {
        let eperm = |store: &'static str| object_store::Error::Generic {
            store,
            source: Box::new(std::io::Error::from_raw_os_error(1)),
        };
        let local = classify_object_store(eperm("LocalFileSystem"));
        assert_eq!((local.kind(), local.is_retryable()), (&ErrorKind::Backend, false), "{local}");
        let s3 = classify_object_store(eperm("S3"));
        assert_eq!((s3.kind(), s3.is_retryable()), (&ErrorKind::Unavailable, true), "{s3}");
    }

    #[test]
    fn a_missing_file_is_named_even_when_the_operation_is_not() {
        let nf = object_store::Error::NotFound {
            path: "wh/t/metadata/m.avro".into(),
            source: Box::new(std::io::Error::from(std::io::ErrorKind::NotFound)),
        };
        let e = classify(wrapped(nf), "loading table ns.t");
        assert_eq!(e.kind(), &ErrorKind::Corrupt);
        assert!(e.message().contains("file wh/t/metadata/m.avro is missing"), "{e}");
    }

    #[test]
    fn a_location_outside_the_store_is_invalid_input() {
        let e = iceberg::Error::new(iceberg::ErrorKind::Unexpected, "location s3a://x/y is not under the store root")
            .with_source(Error::invalid("location s3a://x/y is not under the store root"));
        assert_eq!(classify(e, "reading s3a://x/y").kind(), &ErrorKind::InvalidInput);
    }
}
