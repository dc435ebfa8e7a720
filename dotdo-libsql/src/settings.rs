//! Settings of the libSQL backend (plain data with documented defaults) and the validated
//! description of where the database lives.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use dotdo_core::{Error, Result};

/// How durable an acknowledged write to a **local file** is (SQLite's `synchronous` pragma in WAL
/// mode). For a remote primary durability is the server's (sqld / Turso) configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous = NORMAL` (default). A committed write is in the WAL file before the call
    /// returns, so it **survives a crash or SIGKILL of the process**. After a power loss or OS
    /// crash the transactions committed since the last checkpoint may be lost (never corrupted; but
    /// see docs/durability.md on libSQL's bundled SQLite and files several processes write).
    #[default]
    Normal,
    /// `synchronous = FULL`. The WAL is fsynced on every commit: a committed write also
    /// **survives power loss**. Costs one fsync per write.
    Full,
}

/// How a transaction's statements travel to the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Transport {
    /// Prepared statements with bound parameters, one call each, on a local file (the connection
    /// is in-process, a call costs microseconds); one batch per round trip on a remote primary
    /// (default).
    #[default]
    Auto,
    /// Always render each round trip as one SQL batch with inlined literals (what remote mode
    /// sends over HTTP), also on a local file. Slower locally; useful to exercise the remote code
    /// path without a server.
    Batch,
}

/// The largest [`LibsqlSettings::retries`] accepted.
pub const MAX_RETRIES: u32 = 100;

/// The largest [`LibsqlSettings::max_backoff`] (60 s).
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Settings of a [`LibsqlStore`](crate::LibsqlStore).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibsqlSettings {
    /// Durability of acknowledged writes to a local file. Default [`Durability::Normal`]. No
    /// effect on a remote primary (the server's setting) nor on an embedded replica's file (a
    /// write is durable once the primary has it; the replica file is libsql's to sync).
    pub durability: Durability,
    /// How long one local SQLite call waits for a lock held by another connection or process
    /// before reporting busy. Default 2 s. (No effect on a remote primary, nor on an embedded
    /// replica's reads: libsql's replica connections take no busy timeout, so a read that meets
    /// a lock on the replica file is busy at once and waits only the `retries`' backoff.)
    pub busy_timeout: Duration,
    /// How many times a transiently failing call (busy database, unreachable or overloaded
    /// primary) is retried, with doubling backoff from `retry_backoff` up to `max_backoff`, before
    /// it fails with a retryable `Unavailable`. A mutating call whose request may have reached the
    /// primary is not retried: it fails with `AmbiguousOutcome` (a lease release and the schema
    /// program, safe to repeat, are the exceptions). Default 5. The same budget
    /// (every attempt's `busy_timeout`, or for a remote primary the larger of it and
    /// `request_timeout`, plus the backoff) bounds a write call's wait for the
    /// store's own write connection, so writers queued in one process fail in bounded time.
    /// At most [`MAX_RETRIES`] (100).
    pub retries: u32,
    /// First backoff between retries. Default 10 ms.
    pub retry_backoff: Duration,
    /// Longest backoff between retries. Default 1 s; at most [`MAX_BACKOFF`] (60 s).
    pub max_backoff: Duration,
    /// Read connections kept open between reads (idle) for reuse. Default 4. It does not bound
    /// reads running at once: each read takes an idle connection or opens one, and a connection
    /// beyond this many is closed when its read ends.
    pub read_connections: usize,
    /// WAL auto-checkpoint threshold in pages for a local file. Default 16 384 (64 MiB of 4 KiB
    /// pages), as in dotdo-sqlite; also the size the WAL file is cut back to when it starts over
    /// (`journal_size_limit`, at least 4 MiB). Zero with `background_checkpoint` off is refused
    /// for a local file (nothing would checkpoint it).
    pub wal_autocheckpoint_pages: u32,
    /// SQLite page cache of each connection to a local file, in KiB (`PRAGMA cache_size`;
    /// allocated as used). Default 64 MiB, as in dotdo-sqlite: with SQLite's own 2 MiB, reads of
    /// a working set beyond it fetch pages from the OS on every call (point reads over 10k keys
    /// of one object were ~20% slower). (No effect on a remote primary, nor on an embedded
    /// replica, whose connections libsql does not let set it.)
    pub cache_kib: u32,
    /// Background WAL checkpoints for a **local file**: a thread per store copies committed WAL
    /// frames into the database file every this often (`PRAGMA wal_checkpoint(PASSIVE)`, on its
    /// own connection, holding the store's write connection for the round so that no commit of
    /// this store runs meanwhile: see docs/durability.md; it never waits for readers), so a commit rarely crosses
    /// `wal_autocheckpoint_pages` and pays for the copy and its fsync inline; that threshold
    /// stays as the safety net. `None`: checkpoints only inline, on the committing writer's
    /// thread (so does zero). Under `Durability::Normal` the WAL reaches the disk at checkpoints,
    /// so this period bounds what a power loss can take (see docs/durability.md). Default 50 ms, as in dotdo-sqlite;
    /// under 1 ms is refused. (No effect
    /// on a remote primary or an embedded replica, whose file libsql's replicator writes.) The
    /// check for a database file deleted or replaced while the store has it open runs in this
    /// thread's rounds: with `None` (or zero) such a file is not detected, as in dotdo-sqlite.
    pub background_checkpoint: Option<Duration>,
    /// How statements travel. Default [`Transport::Auto`].
    pub transport: Transport,
    /// How long one request to a remote primary (a write, or a read of a remote store) may take
    /// before it is abandoned (an embedded replica's pulls are not bounded by it): libsql's HTTP client has no timeout of its own, so a primary that stops
    /// answering without closing the connection would hold the caller (and every writer queued
    /// behind it) for minutes. A write then fails with `AmbiguousOutcome` (it may have run), a
    /// read is retried like any transient failure. A TCP connect to the primary may take half of
    /// it: a primary that drops connection attempts (a firewall, a host gone) is then a retryable
    /// `Unavailable`, nothing sent. (A DNS lookup or TLS handshake that stalls still waits out the
    /// whole timeout.) Default 15 s. It must cover the largest request a caller sends: a write
    /// batch near `WriteBatch::MAX_BYTES` (64 MiB) travels as hex text with each value twice
    /// (change log and state), about four times its size, and on a slow link or primary needs
    /// longer. (No effect on a local file.)
    pub request_timeout: Duration,
    /// How long each attempt of an embedded replica's pull from the primary (at open, after each
    /// write, and before a read while the replica may lack committed writes) may take, a wait
    /// for a pull still running from an earlier call included; an attempt that fails is retried
    /// up to `retries` times, one that runs out of this time is not (its pull goes on). At
    /// open and before a read the call then fails with a retryable `Unavailable`; after a write
    /// (committed on the primary) the write returns, and the next read pulls first. libsql's replication client has no timeout of its
    /// own: a primary that stops answering would otherwise hold the call for as long as the OS
    /// keeps the connection (minutes). The pull itself is not cut off midway (libsql's
    /// replicator is not made for that): it runs on, and the next pull waits for it. Default
    /// 60 s. (Only for embedded replicas.)
    pub sync_timeout: Duration,
}

impl Default for LibsqlSettings {
    fn default() -> Self {
        LibsqlSettings {
            durability: Durability::Normal,
            busy_timeout: Duration::from_secs(2),
            retries: 5,
            retry_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
            read_connections: 4,
            wal_autocheckpoint_pages: 16 * 1024,
            cache_kib: 64 * 1024,
            background_checkpoint: Some(Duration::from_millis(50)),
            transport: Transport::Auto,
            request_timeout: Duration::from_secs(15),
            sync_timeout: Duration::from_secs(60),
        }
    }
}

impl LibsqlSettings {
    /// The nominal backoff before retry number `attempt` (1-based): `retry_backoff *
    /// 2^(attempt-1)`, capped at `max_backoff`. The store waits a random length between half of
    /// it and all of it (jitter), so budgets computed from it are upper bounds.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        self.retry_backoff.saturating_mul(factor).min(self.max_backoff)
    }

    /// The longest total time a call spends sleeping between retries.
    pub fn max_total_backoff(&self) -> Duration {
        (1..=self.retries).map(|a| self.backoff(a)).fold(Duration::ZERO, Duration::saturating_add)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.retries > MAX_RETRIES {
            return Err(Error::invalid(format!(
                "retries {} is above {MAX_RETRIES}: a call would wait for minutes or hours on a store that is down",
                self.retries
            )));
        }
        if self.read_connections == 0 {
            return Err(Error::invalid("read_connections must be at least 1"));
        }
        dotdo_core::sql_schema::validate_busy_timeout(self.busy_timeout)?;
        if self.request_timeout.is_zero() {
            return Err(Error::invalid("request_timeout must be positive"));
        }
        if self.background_checkpoint.is_some_and(|d| !d.is_zero() && d < Duration::from_millis(1)) {
            return Err(Error::invalid(format!(
                "background_checkpoint {:?} is under 1 ms (None or zero turns it off)",
                self.background_checkpoint
            )));
        }
        if self.sync_timeout.is_zero() {
            return Err(Error::invalid("sync_timeout must be positive"));
        }
        if self.retry_backoff > self.max_backoff {
            return Err(Error::invalid("retry_backoff must not exceed max_backoff"));
        }
        if self.max_backoff > MAX_BACKOFF {
            // One transient failure would hold the call for that long (Duration::MAX: forever).
            return Err(Error::invalid(format!("max_backoff {:?} is above {MAX_BACKOFF:?}", self.max_backoff)));
        }
        Ok(())
    }
}

/// An auth token for a remote primary. Never printed: its `Debug` is redacted (it has no
/// `Display`).
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken(String);

impl AuthToken {
    /// Wrap a token (a Turso JWT, or empty for an sqld without auth).
    pub fn new(token: impl Into<String>) -> Self {
        AuthToken(token.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Check the token's shape without a server: visible ASCII only, no whitespace or control
    /// characters (it goes into an HTTP header), at most 16 KiB. An empty token is allowed (sqld without auth).
    pub fn validate(&self) -> Result<()> {
        if self.0.len() > 16 * 1024 {
            return Err(Error::invalid(format!("auth token is {} bytes, longer than 16 KiB", self.0.len())));
        }
        if self.0.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::invalid(
                "auth token contains whitespace or control characters (pass the bare token, without `Bearer `)",
            ));
        }
        // An HTTP header value and a gRPC metadata value (the replica's) take visible ASCII only:
        // a replica refused a non-ASCII token as a replication failure, retried as an outage.
        if !self.0.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::invalid("auth token has characters other than visible ASCII"));
        }
        Ok(())
    }
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("AuthToken(<empty>)")
        } else {
            f.write_str("AuthToken(<redacted>)")
        }
    }
}

impl From<&str> for AuthToken {
    fn from(s: &str) -> Self {
        AuthToken::new(s)
    }
}

impl From<String> for AuthToken {
    fn from(s: String) -> Self {
        AuthToken::new(s)
    }
}

/// Validate a primary's URL without contacting it (messages show it without its query string):
/// `libsql://`, `https://` or `http://`, a non-empty host, no credentials, query or fragment in
/// the URL, no whitespace. Returns the URL as libsql expects it
/// (`libsql://` is kept; libsql maps it to HTTPS).
pub fn validate_url(url: &str) -> Result<String> {
    let url = url.trim();
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        Error::invalid(format!("primary URL {:?} has no scheme; use libsql://, https:// or http://", shown(url)))
    })?;
    if !is_scheme(scheme) {
        // (Not shown as written: it may hold a `user:password@` placed before the scheme.)
        return Err(Error::invalid(format!(
            "primary URL {:?} does not start with a scheme; use libsql://, https:// or http://",
            shown(url)
        )));
    }
    let scheme_lc = scheme.to_ascii_lowercase();
    if !matches!(scheme_lc.as_str(), "libsql" | "https" | "http") {
        return Err(Error::invalid(format!(
            "primary URL scheme {scheme:?} is not supported; use libsql://, https:// or http://"
        )));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::invalid(format!("primary URL {:?} contains whitespace", shown(url))));
    }
    // Any `@`: a `user:password@` whose password holds `/`, `?` or `#` unescaped would be taken
    // for a host and port or path (and shown in the message).
    if rest.contains('@') {
        return Err(Error::invalid("primary URL must not carry credentials; pass the auth token separately"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if rest.contains(['?', '#']) {
        // libsql appends a query to every request line (an `?authToken=` would travel in clear
        // in every proxy's log, and is ignored: a 401) and a fragment breaks the request path.
        return Err(Error::invalid(format!(
            "primary URL {:?} has a query or fragment, which libsql would send with every request; pass the auth \
             token separately",
            shown(url)
        )));
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6.split_once(']').unwrap_or((v6, ""));
            (h, after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err(Error::invalid(format!("primary URL {:?} has no host", shown(url))));
    }
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(Error::invalid(format!("primary URL {:?} has an invalid port {port:?}", shown(url))));
        }
    }
    let normalized = format!("{scheme_lc}://{rest}");
    // What libsql's HTTP client will build its requests from (it sends libsql:// as https://):
    // a URL it cannot parse (a non-ASCII host: give an IDN in its ASCII form) would fail inside
    // every request as an HTTP error, read as an outage, and be retried for ever.
    let sent = normalized.strip_prefix("libsql://").map_or_else(|| normalized.clone(), |r| format!("https://{r}"));
    if let Err(e) = http::Uri::try_from(sent.as_str()) {
        return Err(Error::invalid(format!("primary URL {:?} is not a valid HTTP URI: {e}", shown(url))));
    }
    Ok(normalized)
}

/// Where the database lives: the three ways to open one. Its `Debug` shows URLs without their
/// query string (which may carry a token) and redacts the auth token.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Target {
    /// A local database file (created if missing).
    Local {
        /// The file.
        path: PathBuf,
    },
    /// A remote primary (Turso / sqld) over HTTP(S); every call is a network round trip.
    Remote {
        /// `libsql://…`, `https://…` or `http://…`.
        url: String,
        /// The auth token (redacted in `Debug`).
        auth_token: AuthToken,
    },
    /// An embedded replica: a local file kept in sync with a remote primary. Reads are local;
    /// writes (and the fencing check inside them) run on the primary.
    Replica {
        /// The local replica file.
        path: PathBuf,
        /// The primary's URL.
        url: String,
        /// The auth token (redacted in `Debug`).
        auth_token: AuthToken,
        /// How often the replica pulls from the primary in the background (besides the pull after
        /// each write of this store). `None`: only after writes and on [`LibsqlStore::sync`](crate::LibsqlStore::sync).
        sync_interval: Option<Duration>,
    },
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Local { path } => f.debug_struct("Local").field("path", path).finish(),
            Target::Remote { url, auth_token } => {
                f.debug_struct("Remote").field("url", &shown(url)).field("auth_token", auth_token).finish()
            }
            Target::Replica { path, url, auth_token, sync_interval } => f
                .debug_struct("Replica")
                .field("path", path)
                .field("url", &shown(url))
                .field("auth_token", auth_token)
                .field("sync_interval", sync_interval)
                .finish(),
        }
    }
}

/// Whether `s` is a URL scheme (RFC 3986: a letter, then letters, digits, `+`, `-` or `.`).
fn is_scheme(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// A URL as shown in messages and `Debug`: scheme, host and path only (a query string or a
/// fragment may carry a token).
fn shown(url: &str) -> String {
    let url = url.trim();
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) if is_scheme(scheme) => (Some(scheme), rest),
        // No scheme, or text before `://` that is none (`user:secret@libsql://…`): all of it
        // is redacted as the rest is.
        _ => (None, url),
    };
    // A `user:password@` (refused, but shown in that very message, and in a builder's Debug),
    // whatever the password holds (`/`, `?`, `#` unescaped): everything up to the last `@` goes
    // (an `@` further on, in a query, hides the host too, which is the safe side).
    let rest = rest.rsplit_once('@').map_or_else(|| rest.to_string(), |(_, after)| format!("***@{after}"));
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    match scheme {
        Some(scheme) => format!("{scheme}://{rest}"),
        None => rest.to_string(),
    }
}

impl Target {
    /// Check URL and token (no network).
    pub fn validate(&self) -> Result<()> {
        match self {
            Target::Local { path } => {
                if path.as_os_str().is_empty() {
                    return Err(Error::invalid("local database path is empty"));
                }
                if path.to_string_lossy().contains('\0') {
                    return Err(Error::invalid(format!("local database path {path:?} contains a NUL byte")));
                }
                // libsql opens only UTF-8 paths (it failed at open as a `Backend` error).
                if path.to_str().is_none() {
                    return Err(Error::invalid(format!(
                        "local database path {path:?} is not UTF-8 (libsql needs UTF-8)"
                    )));
                }
                // libsql opens a separate, empty in-memory (or, for `file:` with no path, temporary)
                // database for every connection, so the store's readers would never see what its
                // writer wrote.
                if dotdo_core::sql_schema::is_private_database(path) {
                    return Err(Error::invalid(
                        "an in-memory libSQL database is not supported (each connection would get its own); use a \
                         file, e.g. in a temporary directory",
                    ));
                }
                dotdo_core::sql_schema::refuse_shared_cache(path)
            }
            Target::Remote { url, auth_token } => {
                validate_url(url)?;
                auth_token.validate()
            }
            Target::Replica { path, url, auth_token, sync_interval } => {
                if path.as_os_str().is_empty() {
                    return Err(Error::invalid("replica path is empty"));
                }
                if path.to_string_lossy().contains('\0') {
                    return Err(Error::invalid(format!("replica path {path:?} contains a NUL byte")));
                }
                if path.to_str().is_none() {
                    return Err(Error::invalid(format!("replica path {path:?} is not UTF-8 (libsql needs UTF-8)")));
                }
                // libsql's replica would open a file of that name in the working directory,
                // while every reader connection opens a private, empty in-memory database.
                if dotdo_core::sql_schema::is_private_database(path) {
                    return Err(Error::invalid(
                        "an embedded replica needs a file path (readers of an in-memory one would each see a \
                         private, empty database)",
                    ));
                }
                dotdo_core::sql_schema::refuse_shared_cache(path)?;
                if sync_interval.is_some_and(|d| d < Duration::from_millis(1)) {
                    // libsql pulls in a loop with this pause: under 1 ms it pulls continuously.
                    return Err(Error::invalid(format!(
                        "replica sync interval {sync_interval:?} is under 1 ms (None: pull after this store's \
                         writes only)"
                    )));
                }
                validate_url(url)?;
                auth_token.validate()
            }
        }
    }

    /// A short description without secrets, for error messages.
    pub fn describe(&self) -> String {
        match self {
            Target::Local { path } => path.display().to_string(),
            Target::Remote { url, .. } => shown(url),
            Target::Replica { path, url, .. } => format!("{} (replica of {})", path.display(), shown(url)),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_token_in_the_url_is_in_no_debug_output_or_message() {
        // Also a `user:password@` written before the scheme.
        for url in ["libsql://db.example.turso.io?authToken=s3cret#s3cret", "user:s3cret@db.example.turso.io://x"] {
            for target in [
                Target::Remote { url: url.into(), auth_token: "t0ken".into() },
                Target::Replica {
                    path: "r.db".into(),
                    url: url.into(),
                    auth_token: "t0ken".into(),
                    sync_interval: None,
                },
            ] {
                let shown = format!("{target:?} {}", target.describe());
                assert!(!shown.contains("s3cret") && !shown.contains("t0ken"), "{shown}");
                assert!(shown.contains("db.example.turso.io"), "{shown}");
            }
        }
        for bad in [
            "libsql://:0?authToken=s3cret",
            "libsql://?authToken=s3cret",
            "libsql://h:99999?authToken=s3cret",
            "user:s3cret@libsql://db.example.turso.io",
        ] {
            let e = validate_url(bad).expect_err(bad);
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
    }

    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let s = LibsqlSettings {
            retry_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            retries: 4,
            ..Default::default()
        };
        assert_eq!(s.backoff(1), Duration::from_millis(10));
        assert_eq!(s.backoff(2), Duration::from_millis(20));
        assert_eq!(s.backoff(3), Duration::from_millis(40));
        assert_eq!(s.backoff(4), Duration::from_millis(50));
        assert_eq!(s.backoff(200), Duration::from_millis(50));
        assert_eq!(s.max_total_backoff(), Duration::from_millis(120));
        let huge = LibsqlSettings { max_backoff: Duration::MAX, retry_backoff: Duration::MAX, retries: 3, ..s };
        assert_eq!(huge.max_total_backoff(), Duration::MAX, "saturates instead of panicking");
    }
}
