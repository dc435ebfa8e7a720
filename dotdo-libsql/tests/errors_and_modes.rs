//! What runs without a libSQL server: URL and token handling, redaction, error mapping of bad
//! files, busy databases and failing primaries (a closed port, a fake HTTP endpoint answering
//! 401 / 503), the retry bound, durability across reopen.
// The remote tests and their helpers need the `remote` feature.
#![cfg_attr(not(feature = "remote"), allow(dead_code, unused_imports))]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "replica")]
#[allow(dead_code)] // only the replica test uses the Hrana test server here
mod support;

use dotdo_core::{Clock, ConsistencyGuard, ErrorKind, HotStore, HotStoreExt, Lease, NodeId, ObjectId, SystemClock};
use dotdo_libsql::{validate_url, AuthToken, Durability, LibsqlSettings, LibsqlStore, Target, Transport};

fn obj() -> ObjectId {
    ObjectId::new("o1").expect("valid")
}

fn fast_retries(retries: u32) -> LibsqlSettings {
    LibsqlSettings {
        retries,
        retry_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        ..Default::default()
    }
}

/// A fake HTTP endpoint answering every request with `status`; counts the requests.
fn fake_http(status: &'static str) -> (u16, Arc<AtomicUsize>) {
    fake_http_body(status, b"nope")
}

/// [`fake_http`] answering with `body`.
fn fake_http_body(status: &'static str, body: &'static [u8]) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(stream) = stream else { continue };
            let c = c.clone();
            std::thread::spawn(move || serve(stream, status, body, &c));
        }
    });
    (port, count)
}

fn serve(stream: TcpStream, status: &str, msg: &[u8], count: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut stream = stream;
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if first {
                first = false;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        count.fetch_add(1, Ordering::SeqCst);
        let head = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n", msg.len());
        if stream.write_all(head.as_bytes()).is_err() || stream.write_all(msg).is_err() {
            return;
        }
    }
}

#[test]
fn urls_are_validated_without_a_server() {
    for ok in [
        "libsql://my-db-my-org.turso.io",
        "https://my-db-my-org.turso.io",
        "http://127.0.0.1:8080",
        "http://[::1]:8080/",
        "HTTPS://Example.com/db",
    ] {
        validate_url(ok).unwrap_or_else(|e| panic!("{ok} should be valid: {e}"));
    }
    assert_eq!(validate_url("HTTPS://Example.com").expect("valid"), "https://Example.com");
    for bad in [
        "my-db.turso.io",
        "ws://db.example.com",
        "wss://db.example.com",
        "file:///tmp/x.db",
        "postgres://db",
        "http://",
        "http://:8080",
        "https://user:secret@db.example.com",
        "http://db.example.com:99999",
        "http://db.example.com:0",
        "http://db.example.com:port",
        "http://db example.com",
        "",
        // Not an HTTP URI the client can send to (an IDN host must be given in its ASCII form):
        // failed inside every request before, as an outage.
        "http://bücher.invalid",
        // A query travels with every request libsql sends (a token in it, in clear, in every
        // proxy's log); a fragment breaks the request path.
        "libsql://db.example.turso.io?authToken=abc",
        "https://Example.com/db?x=1",
        "https://Example.com/db#frag",
    ] {
        let e = validate_url(bad).expect_err(bad);
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{bad}: {e}");
        assert!(!e.is_retryable());
    }
}

#[tokio::test]
async fn bad_urls_and_tokens_are_invalid_input_before_any_io() {
    let (_refusing, port) = dotdo_core::testkit::refused_port();
    for url in ["ftp://127.0.0.1", "127.0.0.1:8080", "http://u:p@127.0.0.1"] {
        let e = LibsqlStore::remote(url, "tok").open().await.expect_err(url);
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{url}: {e}");
    }
    let url = format!("http://127.0.0.1:{port}");
    for token in ["Bearer abc", "abc def", "abc\n", "a\u{7}b", "tøken"] {
        let e = LibsqlStore::remote(url.clone(), token).open().await.expect_err(token);
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{token:?}: {e}");
        assert!(!e.to_string().contains(token.trim()), "the token must not be echoed: {e}");
    }
    let e = LibsqlStore::remote(url.clone(), "x".repeat(17 * 1024)).open().await.expect_err("huge token");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    let e = LibsqlStore::replica("", url.clone(), "t", None).open().await.expect_err("no path");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    let e =
        LibsqlStore::replica("r.db", url.clone(), "t", Some(Duration::ZERO)).open().await.expect_err("zero interval");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    // libsql pulls in a loop with this pause: 1 µs would pull continuously.
    let e =
        LibsqlStore::replica("r.db", url.clone(), "t", Some(Duration::from_micros(1))).open().await.expect_err("1 µs");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    // A shared-cache file: its readers would fail while a write runs.
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = format!("file:{}?cache=shared", dir.path().join("hot.db").display());
    let e = LibsqlStore::local(shared.clone()).open().await.expect_err("shared cache");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    let e = LibsqlStore::replica(shared, url.clone(), "t", None).open().await.expect_err("shared cache replica");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    // An in-memory replica: libsql's replica would open a file of that name, and each reader a
    // private, empty in-memory database (every read `Backend`: no such table).
    for path in [":memory:", "file::memory:", "file:r?mode=memory"] {
        let e = LibsqlStore::replica(path, url.clone(), "t", None).open().await.expect_err(path);
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{path}: {e}");
    }
}

#[test]
fn auth_tokens_are_redacted_in_debug_output() {
    let secret = "eyJhbGciOiJFZERTQSJ9.super-secret-token";
    let token = AuthToken::new(secret);
    assert_eq!(format!("{token:?}"), "AuthToken(<redacted>)");
    assert_eq!(token.expose(), secret);
    let b = LibsqlStore::remote("libsql://db.turso.io", secret);
    let shown = format!("{b:?} {:?}", b.target());
    assert!(!shown.contains("super-secret"), "{shown}");
    assert!(shown.contains("libsql://db.turso.io"), "{shown}");
    let r = LibsqlStore::replica("replica.db", "libsql://db.turso.io", secret, Some(Duration::from_secs(1)));
    assert!(!format!("{r:?}").contains("super-secret"));
    assert_eq!(format!("{:?}", AuthToken::new("")), "AuthToken(<empty>)");
    assert_eq!(Target::Local { path: "x.db".into() }.describe(), "x.db");
    // A password in the URL (refused) is in no message and no Debug output either.
    for url in [
        "libsql://u:s3cret@db.turso.io",
        "u:s3cret@db.turso.io",
        "libsql://u:s3cret@db x",
        "http://u:s3cret@h/p?q",
        "libsql://u:s3c/ret@db.turso.io",
        "libsql://u:s3c?ret@db.turso.io",
        "libsql://u:s3c#ret@db.turso.io",
    ] {
        let b = LibsqlStore::remote(url, "tok");
        let shown = format!("{b:?} {:?} {}", b.target(), b.target().describe());
        assert!(!shown.contains("s3c"), "{shown}");
        let e = validate_url(url).expect_err(url);
        assert!(!e.to_string().contains("s3c"), "{url}: {e}");
    }
}

#[test]
fn settings_are_validated() {
    for bad in [
        LibsqlSettings { read_connections: 0, ..Default::default() },
        // "Retry forever" is no setting: each call would wait unboundedly on a store that is down.
        LibsqlSettings { retries: u32::MAX, ..Default::default() },
        LibsqlSettings { retries: dotdo_libsql::MAX_RETRIES + 1, ..Default::default() },
        LibsqlSettings {
            retry_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(1),
            ..Default::default()
        },
        // SQLite counts the busy timeout in i32 milliseconds; libsql would truncate this one.
        LibsqlSettings { busy_timeout: Duration::from_secs(30 * 86_400), ..Default::default() },
        // A thread checkpointing in a tight loop.
        LibsqlSettings { background_checkpoint: Some(Duration::from_nanos(1)), ..Default::default() },
        // One transient failure holding a call for hours (or for ever).
        LibsqlSettings { max_backoff: dotdo_libsql::MAX_BACKOFF + Duration::from_secs(1), ..Default::default() },
        LibsqlSettings { retry_backoff: Duration::MAX, max_backoff: Duration::MAX, ..Default::default() },
        // Nothing would checkpoint a local file's WAL: it would grow with every write until close.
        LibsqlSettings { wal_autocheckpoint_pages: 0, background_checkpoint: None, ..Default::default() },
        // SQLite reads a value over i32::MAX as 0: automatic checkpoints off.
        LibsqlSettings { wal_autocheckpoint_pages: 1 << 31, background_checkpoint: None, ..Default::default() },
        // Read as 0 too: the page cache silently at its minimum.
        LibsqlSettings { cache_kib: u32::MAX, ..Default::default() },
    ] {
        let e = LibsqlStore::local("x.db").with_settings(bad).validate().expect_err("invalid settings");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    }
    // No effect on a remote primary, whose file is the server's to checkpoint.
    let none = LibsqlSettings { wal_autocheckpoint_pages: 0, background_checkpoint: None, ..Default::default() };
    LibsqlStore::remote("https://db.example.com", "").with_settings(none).validate().expect("remote");
}

#[cfg(feature = "remote")]
#[tokio::test]
async fn an_unreachable_primary_is_unavailable_and_retryable_within_the_retry_bound() {
    let settings = fast_retries(3);
    let bound = settings.max_total_backoff();
    let clock = SystemClock::new();
    let (_refusing, port) = dotdo_core::testkit::refused_port();
    let started = clock.monotonic();
    let e = LibsqlStore::remote(format!("http://127.0.0.1:{port}"), "")
        .with_settings(settings)
        .open()
        .await
        .expect_err("nothing listens there");
    let took = clock.monotonic() - started;
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("after 3 retries"), "{e}");
    // Each backoff waits between half and all of its nominal length (jitter).
    assert!(took >= bound / 2, "retried with backoff: took {took:?}, backoff total {bound:?}");
    assert!(took < bound + Duration::from_secs(5), "bounded: took {took:?}");
}

#[cfg(feature = "remote")]
#[tokio::test]
async fn an_overloaded_primary_is_retried_exactly_the_configured_number_of_times() {
    let (port, requests) = fake_http("503 Service Unavailable");
    let e = LibsqlStore::remote(format!("http://127.0.0.1:{port}"), "tok")
        .with_settings(fast_retries(2))
        .open()
        .await
        .expect_err("503");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
    assert_eq!(requests.load(Ordering::SeqCst), 3, "one try and two retries");
}

/// A gateway's error answer whose body is not UTF-8 (libsql's client unwraps it as a string)
/// is a retryable `Unavailable`, not a panic in the caller's task.
#[cfg(feature = "remote")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_body_that_is_not_utf8_is_unavailable_not_a_panic() {
    let (port, requests) = fake_http_body("502 Bad Gateway", b"\xff\xfe");
    let opened = tokio::spawn(async move {
        LibsqlStore::remote(format!("http://127.0.0.1:{port}"), "tok").with_settings(fast_retries(1)).open().await
    })
    .await
    .expect("no panic");
    let e = opened.expect_err("502");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable(), "{e}");
    assert!(requests.load(Ordering::SeqCst) >= 1);
}

#[cfg(feature = "remote")]
#[tokio::test]
async fn a_rejected_token_is_a_clear_non_retryable_backend_error_and_is_not_retried() {
    for status in ["401 Unauthorized", "403 Forbidden"] {
        let (port, requests) = fake_http(status);
        let e = LibsqlStore::remote(format!("http://127.0.0.1:{port}"), "wrong-token")
            .with_settings(fast_retries(3))
            .open()
            .await
            .expect_err("rejected");
        assert_eq!(e.kind(), &ErrorKind::Backend, "{e}");
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("auth token"), "{e}");
        assert!(!e.to_string().contains("wrong-token"), "{e}");
        assert_eq!(requests.load(Ordering::SeqCst), 1, "{status}: not retried");
    }
}

#[cfg(not(feature = "remote"))]
#[tokio::test]
async fn remote_without_the_feature_says_which_feature_to_enable() {
    let e = LibsqlStore::remote("http://127.0.0.1:1", "").open().await.expect_err("no feature");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("`remote` feature"), "{e}");
}

#[cfg(not(feature = "replica"))]
#[tokio::test]
async fn replica_without_the_feature_says_which_feature_to_enable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = LibsqlStore::replica(dir.path().join("r.db"), "http://127.0.0.1:1", "", None)
        .open()
        .await
        .expect_err("no feature");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("`replica` feature"), "{e}");
}

#[cfg(feature = "replica")]
#[tokio::test]
async fn a_replica_of_an_unreachable_primary_is_unavailable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_refusing, port) = dotdo_core::testkit::refused_port();
    let e = LibsqlStore::replica(
        dir.path().join("r.db"),
        format!("http://127.0.0.1:{port}"),
        "",
        Some(Duration::from_secs(1)),
    )
    .with_settings(fast_retries(1))
    .open()
    .await
    .expect_err("unreachable");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
}

/// A primary whose replication endpoint stops answering without closing the connection (the
/// Hrana endpoint still answers): opening a replica fails with a retryable `Unavailable` within
/// `sync_timeout`, instead of waiting as long as the OS keeps the connection.
#[cfg(feature = "replica")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_primary_stops_answering_pulls_is_unavailable_in_bounded_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = support::hrana::HranaServer::start(&dir.path().join("primary.db"), "tok");
    server.hang_replication();
    let settings = LibsqlSettings {
        request_timeout: Duration::from_millis(500),
        sync_timeout: Duration::from_millis(500),
        ..fast_retries(1)
    };
    let opened = tokio::time::timeout(
        Duration::from_secs(20),
        LibsqlStore::replica(dir.path().join("r.db"), server.url(), "tok", None).with_settings(settings).open(),
    )
    .await
    .expect("bounded by sync_timeout");
    let e = opened.expect_err("the primary does not answer pulls");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("sync_timeout"), "{e}");
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("garbage.db");
    std::fs::write(&path, b"this is not a database, it is a text file with some bytes in it ....".repeat(100))
        .expect("write");
    let e = LibsqlStore::local(&path).open().await.expect_err("garbage");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("garbage.db"), "error names the file: {e}");
}

#[tokio::test]
async fn a_damaged_database_is_reported_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    {
        let s = LibsqlStore::local(&path).open().await.expect("open");
        let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(5)).await.expect("acquire");
        for i in 0..500 {
            s.put(&obj(), l.token, "T", &format!("key-{i}"), vec![i as u8; 300].into()).await.expect("put");
        }
    }
    // Checkpoint so the data is in the main file, then scribble over its pages (not the header).
    {
        let db = libsql::Builder::new_local(&path).build().await.expect("raw open");
        let c = db.connect().expect("connect");
        let mut rows = c.query("PRAGMA wal_checkpoint(TRUNCATE)", ()).await.expect("checkpoint");
        while rows.next().await.expect("row").is_some() {}
    }
    let mut bytes = std::fs::read(&path).expect("read");
    assert!(bytes.len() > 16 * 4096);
    for b in bytes[4096 * 2..4096 * 12].iter_mut() {
        *b = 0xA5;
    }
    std::fs::write(&path, &bytes).expect("write");
    let outcome = async {
        let s = LibsqlStore::local(&path).open().await?;
        s.integrity_check().await?;
        s.list(&obj(), dotdo_core::KeyRange::all(), None).await.map(|_| ())
    }
    .await;
    let e = outcome.expect_err("damage must be detected");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("hot.db"), "the error names the file: {e}");
}

#[tokio::test]
async fn an_unopenable_path_is_unavailable() {
    let e = LibsqlStore::local("/nonexistent-dir/for/sure/hot.db").open().await.expect_err("no dir");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    // SQLite's "cannot open", not an unreachable primary: retrying would not help.
    assert!(!e.is_retryable(), "{e}");
    assert!(!e.to_string().contains("primary"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_gives_unavailable_after_bounded_retries_then_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let settings = LibsqlSettings { busy_timeout: Duration::from_millis(20), ..fast_retries(2) };
    let s = LibsqlStore::local(&path).with_settings(settings).open().await.expect("open");
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(30)).await.expect("acquire");
    let db = libsql::Builder::new_local(&path).build().await.expect("raw");
    let blocker = db.connect().expect("connect");
    blocker.execute("BEGIN EXCLUSIVE", ()).await.expect("lock");
    let e = s.put(&obj(), l.token, "T", "k", "v".into()).await.expect_err("locked");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
    assert!(e.to_string().contains("after 2 retries"), "{e}");
    blocker.execute("ROLLBACK", ()).await.expect("unlock");
    s.put(&obj(), l.token, "T", "k", "v".into()).await.expect("works once unlocked");
    assert_eq!(s.get(&obj(), "k").await.expect("get").as_deref(), Some(&b"v"[..]));
    assert_eq!(s.read_changes(&obj(), 0, 10).await.expect("log").len(), 1, "the failed write left nothing");
}

/// An open while another process holds the file exclusively for longer than one busy timeout
/// (recovering a large WAL after a crash) waits through the retries, as dotdo-sqlite's does:
/// the writer's first statements (its pragmas read the schema) failed the open after one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the lock is held while the open waits
async fn an_open_waits_out_a_lock_longer_than_one_busy_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    drop(LibsqlStore::local(&path).open().await.expect("create the file"));
    let db = libsql::Builder::new_local(&path).build().await.expect("raw");
    let blocker = db.connect().expect("connect");
    // In WAL mode only an exclusive locking mode keeps other connections from reading.
    blocker.execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE;").await.expect("lock");
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(blocker);
        drop(db);
    });
    let settings = LibsqlSettings { busy_timeout: Duration::from_millis(50), ..fast_retries(20) };
    let s = LibsqlStore::local(&path).with_settings(settings).open().await.expect("open waits out the lock");
    release.await.expect("released");
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(30)).await.expect("acquire");
    s.put(&obj(), l.token, "T", "k", "v".into()).await.expect("put");
}

#[tokio::test]
async fn full_durability_persists_across_reopen_and_tokens_keep_rising() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let settings = LibsqlSettings { durability: Durability::Full, ..Default::default() };
    let node = NodeId::new("n").expect("valid");
    let first = {
        let s = LibsqlStore::local(&path).with_settings(settings.clone()).open().await.expect("open");
        let l = s.acquire(&obj(), &node, Duration::from_millis(1)).await.expect("acquire");
        s.put(&obj(), l.token, "T", "k", "v".into()).await.expect("put");
        l.token
    };
    std::thread::sleep(Duration::from_millis(2));
    let s = LibsqlStore::local(&path).with_settings(settings).open().await.expect("reopen");
    assert_eq!(s.get(&obj(), "k").await.expect("get").as_deref(), Some(&b"v"[..]));
    let l = s.acquire(&obj(), &node, Duration::from_secs(1)).await.expect("acquire again");
    assert!(l.token > first);
}

#[tokio::test]
async fn a_file_written_with_prepared_statements_reads_the_same_through_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let node = NodeId::new("n").expect("valid");
    let value = bytes::Bytes::from((0..=255u8).cycle().take(5000).collect::<Vec<u8>>());
    let token = {
        let s = LibsqlStore::local(&path).open().await.expect("open");
        let l = s.acquire(&obj(), &node, Duration::from_secs(60)).await.expect("acquire");
        s.put(&obj(), l.token, "T", "it's a key", value.clone()).await.expect("put");
        l.token
    };
    let b = LibsqlStore::local(&path)
        .with_settings(LibsqlSettings { transport: Transport::Batch, ..Default::default() })
        .open()
        .await
        .expect("open batched");
    assert_eq!(b.get(&obj(), "it's a key").await.expect("get"), Some(value.clone()));
    let r = b.put(&obj(), token, "T", "k2", "x".into()).await.expect("put through a batch");
    assert_eq!((r.first_seq, r.last_seq), (2, 2));
    let log = b.read_changes(&obj(), 0, 10).await.expect("log");
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].value, value);
    b.integrity_check().await.expect("healthy");
}

fn roundtrip_in(run: impl FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>)) {
    run(Box::pin(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = LibsqlStore::local(dir.path().join("hot.db")).open().await.expect("open");
        let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(5)).await.expect("acquire");
        s.put(&obj(), l.token, "T", "k", "v".into()).await.expect("put");
        assert_eq!(s.get(&obj(), "k").await.expect("get").as_deref(), Some(&b"v"[..]));
    }));
}

/// A local database file deleted (and a new one made at its path by another store) while a
/// store has it open: within a checkpoint period the store refuses every call with `Corrupt`,
/// as dotdo-sqlite does, instead of going on writing into a file no other process opens (the
/// second store had its own lease table: two holders of one object).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_file_deleted_while_open_is_noticed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let settings = LibsqlSettings { background_checkpoint: Some(Duration::from_millis(10)), ..Default::default() };
    let open = || LibsqlStore::local(&path).with_settings(settings.clone()).open();
    let a = open().await.expect("open");
    dotdo_core::testkit::assert_a_deleted_file_is_noticed(&path, a, || async { open().await.expect("a new file") })
        .await;
}

/// Background checkpoints keep up while writers queue for the store's writer without a break
/// (four tasks writing at once, no inline checkpoints): the WAL stays far below what was
/// written. A round that only tried the writer's lock never got a turn (the lock passes straight
/// to the next waiting write), and the WAL took every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_checkpoints_get_their_turn_between_queued_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let settings = LibsqlSettings {
        background_checkpoint: Some(Duration::from_millis(10)),
        wal_autocheckpoint_pages: 0,
        ..Default::default()
    };
    let s = LibsqlStore::local(&path).with_settings(settings).open().await.expect("open");
    const TASKS: usize = 4;
    const PUTS: usize = 1500;
    const VALUE: usize = 4096;
    let writers = (0..TASKS).map(|t| {
        let s = s.clone();
        tokio::spawn(async move {
            let o = ObjectId::new(format!("w{t}")).expect("valid");
            let l = s.acquire(&o, &NodeId::new("n").expect("valid"), Duration::from_secs(600)).await.expect("acquire");
            for k in 0..PUTS {
                s.put(&o, l.token, "T", &format!("k{}", k % 50), vec![7u8; VALUE].into()).await.expect("put");
            }
        })
    });
    for w in futures::future::join_all(writers).await {
        w.expect("writer");
    }
    let written = (TASKS * PUTS * VALUE) as u64;
    let wal = std::fs::metadata(dir.path().join("hot.db-wal")).expect("wal").len();
    assert!(wal < written / 4, "the WAL holds {wal} bytes of {written} written: checkpoints did not keep up");
}

/// With background checkpoints the database file receives the committed pages without any
/// commit crossing the inline threshold; without them (None or zero) the pages stay in the WAL.
/// Dropping the store stops the thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_checkpoints_copy_the_wal_into_the_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut db_sizes = Vec::new();
    for (i, background) in [None, Some(Duration::ZERO), Some(Duration::from_millis(10))].into_iter().enumerate() {
        let path = dir.path().join(format!("hot-{i}.db"));
        let settings = LibsqlSettings {
            background_checkpoint: background,
            wal_autocheckpoint_pages: 1_000_000,
            ..Default::default()
        };
        let s = LibsqlStore::local(&path).with_settings(settings).open().await.expect("open");
        assert_eq!(format!("{s:?}").contains("background_checkpoints: true"), i == 2, "{s:?}");
        let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
        let empty = std::fs::metadata(&path).expect("db").len();
        for k in 0..200 {
            s.put(&obj(), l.token, "T", &format!("k{k}"), vec![7u8; 1000].into()).await.expect("put");
        }
        // Real time: the checkpoint thread runs on its own. Without it, 300 ms show that
        // nothing moves; with it, wait (up to 10 s on a loaded machine) for the pages to arrive.
        let waited = SystemClock::new();
        let start = waited.monotonic();
        loop {
            #[allow(clippy::disallowed_methods)]
            tokio::time::sleep(Duration::from_millis(if i == 2 { 10 } else { 300 })).await;
            let size = std::fs::metadata(&path).expect("db").len();
            if i < 2 || size > empty + 200 * 1000 || waited.monotonic().saturating_sub(start) > Duration::from_secs(10)
            {
                break;
            }
        }
        db_sizes.push((empty, std::fs::metadata(&path).expect("db").len()));
        drop(s);
    }
    for (empty, size) in &db_sizes[..2] {
        assert_eq!(size, empty, "no checkpoint ran: the pages are still in the WAL: {db_sizes:?}");
    }
    let (empty, with) = db_sizes[2];
    assert!(with > empty + 200 * 1000, "background checkpoints copied the pages: {db_sizes:?}");
}

#[test]
fn a_local_store_works_on_every_kind_of_executor() {
    roundtrip_in(|f| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt").block_on(f));
    roundtrip_in(|f| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt").block_on(f)
    });
    roundtrip_in(futures::executor::block_on);
}

/// On a multi-thread runtime with ONE worker, a local put that waits for SQLite's write lock
/// (held by another connection) does not stall the worker: other tasks keep running meanwhile.
/// A put waiting for the write lock another connection holds does not stall the (only) worker:
/// other tasks keep running (a put forced inline fails this with 0 ticks in 300 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn local_calls_do_not_stall_other_tasks_on_a_multi_thread_runtime() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let settings = LibsqlSettings { busy_timeout: Duration::from_secs(5), ..Default::default() };
    let s = LibsqlStore::local(&path).with_settings(settings).open().await.expect("open");
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(30)).await.expect("acquire");
    let holder_db = libsql::Builder::new_local(&path).build().await.expect("second handle");
    let holder = holder_db.connect().expect("connect");
    holder.execute("BEGIN IMMEDIATE", ()).await.expect("take the write lock");
    let put = async move { s.put(&obj(), l.token, "T", "k", "v".into()).await };
    let release = async {
        holder.execute("COMMIT", ()).await.expect("release the lock");
    };
    dotdo_core::testkit::assert_waiting_call_does_not_stall(put, release).await.expect("the put goes through");
}

/// A read that opens a reader connection while another process holds every WAL read mark of
/// the file (as a process recovering its WAL after a crash holds the WAL index) waits for it (the
/// connection's pragmas read the schema) without stalling the (only) worker: the connect runs as
/// a statement does (it ran on the worker, which showed no tick while the marks were held).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_read_opening_a_connection_on_a_locked_file_does_not_stall_other_tasks() {
    use std::io::{BufRead, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let s = LibsqlStore::local(&path).open().await.expect("open");
    // SQLite's unix VFS locks the WAL index's read marks at bytes 123..128 of the -shm file; a
    // lock of another process (fcntl locks are per process) is what SQLite waits on.
    let shm = dir.path().join("hot.db-shm");
    assert!(shm.exists(), "the store has the WAL index open");
    let holder = "import fcntl, sys\nf = open(sys.argv[1], 'r+b')\nfcntl.lockf(f, fcntl.LOCK_EX, 5, 123, 0)\n\
                  print('locked', flush=True)\nsys.stdin.read()\n";
    // Any Python 3 holds the lock (`fcntl`); without one the test is skipped, unless
    // `DOTDO_REQUIRE_PYTHON` is set (as `scripts/test` sets it).
    let spawned = std::process::Command::new(std::env::var("DOTDO_PYTHON").unwrap_or_else(|_| "python3".into()))
        .args(["-c", holder])
        .arg(&shm)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if std::env::var_os("DOTDO_REQUIRE_PYTHON").is_none() => {
            eprintln!("SKIP a_read_opening_a_connection_on_a_locked_file_does_not_stall_other_tasks: no python3 ({e})");
            return;
        }
        Err(e) => panic!("python3 runs the lock holder: {e}"),
    };
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "locked");
    let mut stdin = child.stdin.take().expect("stdin");
    let get = async move { s.get(&obj(), "k").await };
    let release = async move {
        stdin.write_all(b"done").expect("write");
        drop(stdin);
        child.wait().expect("the holder ends");
    };
    let got = dotdo_core::testkit::assert_waiting_call_does_not_stall(get, release).await;
    assert_eq!(got.expect("the read goes through"), None);
}

#[tokio::test]
async fn a_lease_row_that_does_not_decode_is_corrupt_never_a_free_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let s = LibsqlStore::local(&path).open().await.expect("open");
    let n1 = NodeId::new("n1").expect("valid");
    let n2 = NodeId::new("n2").expect("valid");
    s.acquire(&obj(), &n1, Duration::from_secs(60)).await.expect("acquire");
    // Another writer (or the predecessor's do_locks) left a holder that is not a valid node id.
    let raw = libsql::Builder::new_local(&path).build().await.expect("raw open");
    let c = raw.connect().expect("connect");
    c.execute("UPDATE do_locks SET node_id = '' WHERE do_id = ?1", [obj().as_str()]).await.expect("damage");
    let e = s.current(&obj()).await.expect_err("current");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    let e = s.acquire(&obj(), &n2, Duration::from_secs(60)).await.expect_err("a damaged live lease is not free");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "as dotdo-sqlite says: {e}");
}

/// A local `read_changes` returns at most `REMOTE_CHANGES_BYTES` of values too (at least one
/// change), stepping no further: a drain of a backlog of large values loaded it whole.
#[tokio::test]
async fn local_change_reads_are_bounded_in_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = LibsqlStore::local(dir.path().join("hot.db")).open().await.expect("open");
    dotdo_core::testkit::hot::assert_change_reads_are_bounded_in_bytes(&s, dotdo_libsql::REMOTE_CHANGES_BYTES).await;
}

/// A store on a manual clock holding the lease of `obj()` (TTL 10 s), and its file's path.
async fn store_on_a_manual_clock(
    dir: &std::path::Path,
) -> (LibsqlStore, Arc<dotdo_core::ManualClock>, dotdo_core::Lease, std::path::PathBuf) {
    let path = dir.join("hot.db");
    let clock = Arc::new(dotdo_core::ManualClock::new(dotdo_core::testkit::KIT_EPOCH));
    let s = LibsqlStore::local(&path).with_clock(clock.clone()).open().await.expect("open");
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(10)).await.expect("acquire");
    (s, clock, l, path)
}

/// Run `call` queued for the store's writer behind a put under `lease` that waits for another
/// process's write lock, while the clock moves on by 11 s (past a 10 s TTL); returns its output.
#[allow(clippy::disallowed_methods)] // real time: letting the spawned calls queue
async fn queued_past_a_ttl<T: Send + 'static>(
    s: &LibsqlStore,
    path: &std::path::Path,
    clock: &dotdo_core::ManualClock,
    lease: &dotdo_core::Lease,
    call: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let holder_db = libsql::Builder::new_local(path).build().await.expect("second handle");
    let holder = holder_db.connect().expect("connect");
    holder.execute("BEGIN IMMEDIATE", ()).await.expect("take the write lock");
    // The put takes the store's writer and waits for the lock; the call queues behind it.
    let put = tokio::spawn({
        let (s, token) = (s.clone(), lease.token);
        async move { s.put(&obj(), token, "T", "k", "v".into()).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let call = tokio::spawn(call);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!put.is_finished() && !call.is_finished(), "both calls wait");
    clock.advance(Duration::from_secs(11));
    holder.execute("COMMIT", ()).await.expect("release the lock");
    put.await.expect("put task").expect("the put goes through");
    call.await.expect("the call's task")
}

/// A refresh reads the time once the store's writer is its own: queued behind a write that waits
/// for another process's lock while the lease runs out, it finds the lease ended (as
/// dotdo-sqlite, which reads the time inside its transaction). It read the time before queueing
/// and extended the ended lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_queued_past_the_expiry_finds_the_lease_ended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, clock, l, path) = store_on_a_manual_clock(dir.path()).await;
    let refresh = {
        let (s, l) = (s.clone(), l.clone());
        async move { s.refresh(&l, Duration::from_secs(10)).await }
    };
    let e = queued_past_a_ttl(&s, &path, &clock, &l, refresh).await.expect_err("the lease ended while it queued");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    assert_eq!(s.current(&obj()).await.expect("current"), None, "the ended lease stays ended");
}

/// An acquire reads the time once the store's writer is its own: queued behind a write that
/// waits for another process's lock for longer than the TTL, it is granted a full TTL from the
/// moment it runs. It read the time before queueing and was granted a lease already over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_queued_past_a_ttl_gets_a_full_ttl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, clock, l, path) = store_on_a_manual_clock(dir.path()).await;
    let other = ObjectId::new("other").expect("valid");
    let acquire = {
        let (s, other) = (s.clone(), other.clone());
        async move { s.acquire(&other, &NodeId::new("m").expect("valid"), Duration::from_secs(10)).await }
    };
    let granted = queued_past_a_ttl(&s, &path, &clock, &l, acquire).await.expect("granted");
    assert_eq!(granted.expires_at, clock.now().plus(Duration::from_secs(10)), "a full TTL from now");
    assert_eq!(s.current(&other).await.expect("current").map(|l| l.token), Some(granted.token), "live");
}

/// [`store_and_raw_connection`] on a new file at `path` whose `tables` were made first (by
/// hand, as another tool's: the store's schema then leaves them as they are).
async fn store_over_tables(
    path: &std::path::Path,
    transport: Transport,
    tables: &[&str],
) -> (LibsqlStore, libsql::Database, libsql::Connection) {
    {
        let raw = libsql::Builder::new_local(path).build().await.expect("raw open");
        let c = raw.connect().expect("connect");
        for sql in tables {
            c.execute(sql, ()).await.expect("a table made by hand");
        }
    }
    store_and_raw_connection(path, transport).await
}

/// A store on the local file `path` with `transport`, and a raw connection to the same file
/// (its database handle kept alive beside it) for damaging rows.
async fn store_and_raw_connection(
    path: &std::path::Path,
    transport: Transport,
) -> (LibsqlStore, libsql::Database, libsql::Connection) {
    let s = LibsqlStore::local(path)
        .with_settings(LibsqlSettings { transport, ..Default::default() })
        .open()
        .await
        .expect("open");
    let raw = libsql::Builder::new_local(path).build().await.expect("raw open");
    let c = raw.connect().expect("connect");
    (s, raw, c)
}

/// A dotdo file SQLite can only open read-only (here `mode=ro`; its permissions or a read-only
/// mount alike) is refused at open, as in dotdo-sqlite: it is already in WAL mode, so nothing at
/// open wrote, the store opened, and every write then failed.
#[tokio::test]
async fn a_file_that_opens_read_only_is_refused_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    drop(LibsqlStore::local(&path).open().await.expect("create"));
    let uri = format!("file:{}?mode=ro", path.display());
    let e = LibsqlStore::local(&uri).open().await.expect_err("read-only");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(!e.is_retryable(), "{e}");
    assert!(e.to_string().contains("cannot be written") && e.to_string().contains("hot.db"), "{e}");
}

/// A NULL in a `do_objects` column of a database whose tables were made without `NOT NULL`
/// (another tool's, or repaired by hand) is `Corrupt` to a write on the local path, with nothing
/// written, as on the batch path and in dotdo-sqlite: the local path read a NULL `last_seq` as 0
/// and logged the next change as seq 1 again (answering `Ok`), a change the drain, past the
/// seqs cold storage already held, would never send.
#[tokio::test]
async fn a_null_in_the_object_row_is_corrupt_to_a_write_on_either_path() {
    for transport in [Transport::Auto, Transport::Batch] {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = "CREATE TABLE do_objects (do_id TEXT PRIMARY KEY, last_seq INTEGER, truncated_through INTEGER, \
                     max_token INTEGER) WITHOUT ROWID";
        let (s, _raw, c) = store_over_tables(&dir.path().join("hot.db"), transport, &[table]).await;
        let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
        for v in ["1", "2", "3"] {
            s.put(&obj(), l.token, "T", "k", v.into()).await.expect("put");
        }
        s.truncate_changes(&obj(), l.token, 3).await.expect("truncate");
        let token = l.token.get().to_string();
        for (column, was) in [("last_seq", "3"), ("truncated_through", "3"), ("max_token", token.as_str())] {
            c.execute(&format!("UPDATE do_objects SET {column} = NULL"), ()).await.expect("damage");
            let e = s.put(&obj(), l.token, "T", "k", "4".into()).await.expect_err("a NULL is no sequence number");
            assert_eq!(e.kind(), &ErrorKind::Corrupt, "{transport:?}, {column}: {e}");
            // Also to `object_info`, which a drain decides on (it read the NULL as 0).
            let e = s.object_info(&obj()).await.expect_err("a NULL is no sequence number");
            assert_eq!(e.kind(), &ErrorKind::Corrupt, "{transport:?}, {column}: {e}");
            let mut rows = c.query("SELECT count(*) FROM do_changes", ()).await.expect("count");
            let n: i64 = rows.next().await.expect("row").expect("one row").get(0).expect("count");
            assert_eq!(n, 0, "{transport:?}, {column}: nothing logged");
            c.execute(&format!("UPDATE do_objects SET {column} = {was}"), ()).await.expect("repair");
        }
        assert_eq!(s.put(&obj(), l.token, "T", "k", "4".into()).await.expect("repaired").first_seq, 4);
    }
}

/// A NULL value, op code or time in a database whose `do_state` and `do_changes` were made
/// without `NOT NULL` is `Corrupt` to `get`, `list` and `read_changes` on either path, as in
/// dotdo-sqlite: a NULL value was read as an empty one (`get` answered `Some("")`, a change with
/// a NULL op code a put of nothing).
#[tokio::test]
async fn a_null_value_op_or_time_is_corrupt_to_reads() {
    for transport in [Transport::Auto, Transport::Batch] {
        let dir = tempfile::tempdir().expect("tempdir");
        let tables = [
            "CREATE TABLE do_state (do_id TEXT NOT NULL, key TEXT NOT NULL, value BLOB, seq INTEGER NOT NULL, \
             UNIQUE (do_id, key))",
            "CREATE TABLE do_changes (do_id TEXT NOT NULL, seq INTEGER NOT NULL, key TEXT NOT NULL, op INTEGER, \
             value BLOB, token INTEGER NOT NULL, ts INTEGER, type TEXT NOT NULL, PRIMARY KEY (do_id, seq)) \
             WITHOUT ROWID",
        ];
        let (s, _raw, c) = store_over_tables(&dir.path().join("hot.db"), transport, &tables).await;
        let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
        s.put(&obj(), l.token, "T", "k", "v".into()).await.expect("put");
        c.execute("UPDATE do_state SET value = NULL", ()).await.expect("damage");
        let e = s.get(&obj(), "k").await.expect_err("a NULL is no value");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{transport:?}, get: {e}");
        let e = s.list(&obj(), dotdo_core::KeyRange::all(), None).await.expect_err("a NULL is no value");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{transport:?}, list: {e}");
        for column in ["value", "op", "ts"] {
            c.execute(&format!("UPDATE do_changes SET {column} = NULL"), ()).await.expect("damage");
            let e = s.read_changes(&obj(), 0, 10).await.expect_err("a NULL in a change");
            assert_eq!(e.kind(), &ErrorKind::Corrupt, "{transport:?}, change {column}: {e}");
            let was = match column {
                "value" => "CAST('v' AS BLOB)",
                "op" => "0",
                _ => "1",
            };
            c.execute(&format!("UPDATE do_changes SET {column} = {was}"), ()).await.expect("repair");
        }
        assert_eq!(s.read_changes(&obj(), 0, 10).await.expect("repaired").len(), 1);
    }
}

/// A change row no dotdo writer stores (a token or sequence number out of range, an invalid key,
/// value or type) is `Corrupt` to `read_changes`, naming the database, as in dotdo-sqlite.
#[tokio::test]
async fn change_rows_no_writer_makes_are_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let (s, _raw, c) = store_and_raw_connection(&path, Transport::Auto).await;
    let c = &c;
    let damage = |sql: &'static str, o: ObjectId| async move {
        c.execute(sql, [o.as_str()]).await.expect(sql);
    };
    dotdo_core::testkit::assert_damaged_change_rows_are_corrupt(&s, "hot.db", damage).await;
    // Text that is not UTF-8, a NUL, a blob where text belongs, numbers stored as text, in the
    // columns other reads return.
    dotdo_core::testkit::assert_damaged_text_is_corrupt(&s, damage).await;
}

/// A change-log row whose object id is not valid makes `objects_with_pending_changes` `Corrupt`
/// naming the database, as every other `Corrupt` of the store does (as in dotdo-sqlite).
#[tokio::test]
async fn an_invalid_object_id_in_the_change_log_is_corrupt_naming_the_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let (s, _raw, c) = store_and_raw_connection(&path, Transport::Auto).await;
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
    s.put(&obj(), l.token, "T", "k", "v".into()).await.expect("put");
    c.execute("UPDATE do_changes SET do_id = 'bad id!'", ()).await.expect("damage");
    let e = s.objects_with_pending_changes(None, 10).await.expect_err("damaged");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("hot.db"), "names the database: {e}");
}

/// A lease row that does not decode makes `current` and `validate` `Corrupt` naming the object
/// and the database (it named neither), and an outage of a write names the database too.
#[tokio::test]
async fn a_damaged_lease_row_is_corrupt_naming_the_object_and_the_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let (s, _raw, c) = store_and_raw_connection(&path, Transport::Auto).await;
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
    c.execute("UPDATE do_locks SET node_id = CAST(X'6EFF' AS TEXT)", ()).await.expect("damage");
    for e in [
        s.current(&obj()).await.expect_err("a holder that is not UTF-8"),
        s.validate(&l).await.expect_err("a holder that is not UTF-8"),
    ] {
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        let shown = e.to_string();
        assert!(shown.contains("hot.db") && shown.contains(obj().as_str()), "names both: {e}");
    }
}

/// Rows of an object with a live lease that do not decode make every fenced call `Corrupt`,
/// with nothing written, on both transports, as in dotdo-sqlite. The calls deciding in SQL
/// compared a text token above every integer and read it as 0: `truncate_changes`, `evict` and
/// `restore` answered "done" having done nothing, or a write answered `Fenced`.
#[tokio::test]
async fn fenced_calls_on_rows_that_do_not_decode_are_corrupt_and_write_nothing() {
    for transport in [Transport::Auto, Transport::Batch] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, _raw, c) = store_and_raw_connection(&dir.path().join("hot.db"), transport).await;
        for (i, (what, damage, written)) in dotdo_core::testkit::damaged_object_rows().enumerate() {
            let o = ObjectId::new(format!("o{i}")).expect("valid");
            let l = s.acquire(&o, &NodeId::new("n1").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
            if written {
                s.put(&o, l.token, "T", "k", "v".into()).await.expect("put");
            }
            c.execute(damage, [o.as_str()]).await.expect(&what);
            let rows = || async {
                let mut rows = c.query(dotdo_core::testkit::SQL_OBJECT_ROWS, [o.as_str()]).await.expect("rows");
                rows.next().await.expect("row").expect("one row").get::<String>(0).expect("text")
            };
            let what = format!("{transport:?}, {what}");
            dotdo_core::testkit::assert_fenced_calls_refuse_damaged_rows(&s, &l, &what, rows).await;
        }
    }
}

/// A live lease row whose times do not decode is `Corrupt` to `refresh`, as to `validate` (and
/// in dotdo-sqlite), and stays as it is: the refresh's SQL compared a text expiry above the
/// time, extended the lease and overwrote the damage.
#[tokio::test]
async fn a_live_lease_row_whose_times_do_not_decode_is_corrupt_to_refresh() {
    let n1 = NodeId::new("n1").expect("valid");
    for transport in [Transport::Auto, Transport::Batch] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, _raw, c) = store_and_raw_connection(&dir.path().join("hot.db"), transport).await;
        for (i, (what, damage)) in dotdo_core::testkit::DAMAGED_LIVE_LEASE_TIMES.iter().enumerate() {
            let o = ObjectId::new(format!("o{i}")).expect("valid");
            let l = s.acquire(&o, &n1, Duration::from_secs(60)).await.expect("acquire");
            c.execute(damage, [o.as_str()]).await.expect(what);
            let dump = || async {
                let mut rows = c
                    .query(
                        "SELECT quote(acquired_at) || ' ' || quote(expires_at) FROM do_locks WHERE do_id = ?1",
                        [o.as_str()],
                    )
                    .await
                    .expect("read the row");
                let row = rows.next().await.expect("row").expect("a lease row");
                row.get::<String>(0).expect("text")
            };
            let before = dump().await;
            let e = s.refresh(&l, Duration::from_secs(60)).await.expect_err(what);
            assert_eq!(e.kind(), &ErrorKind::Corrupt, "{transport:?}, {what}: {e}");
            assert_eq!(s.validate(&l).await.expect_err(what).kind(), &ErrorKind::Corrupt, "{transport:?}, {what}");
            assert_eq!(dump().await, before, "{transport:?}, {what}: the damaged row was changed");
        }
    }
}

/// `refresh` answers the lease's stored grant time, also one further from now than a program
/// result carries (granted ~400 days ago, or ~400 days ahead by a clock that went back): read
/// back after the refresh. (It echoed the `acquired_at` passed in.)
#[tokio::test]
async fn a_refresh_answers_the_stored_grant_time_however_old() {
    let n1 = NodeId::new("n1").expect("valid");
    for transport in [Transport::Auto, Transport::Batch] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, _raw, c) = store_and_raw_connection(&dir.path().join("hot.db"), transport).await;
        for (i, shift) in [0i64, -(1 << 45), 1 << 45].into_iter().enumerate() {
            let o = ObjectId::new(format!("o{i}")).expect("valid");
            let l = s.acquire(&o, &n1, Duration::from_secs(60)).await.expect("acquire");
            c.execute("UPDATE do_locks SET acquired_at = acquired_at + ?2 WHERE do_id = ?1", (o.as_str(), shift))
                .await
                .expect("move the grant time");
            let stored = dotdo_core::Timestamp::from_micros(l.acquired_at.as_micros() + shift);
            let passed = Lease { acquired_at: dotdo_core::Timestamp::from_micros(7), ..l.clone() };
            let r = s.refresh(&passed, Duration::from_secs(60)).await.expect("refresh");
            assert_eq!((r.token, r.acquired_at), (l.token, stored), "{transport:?}, shifted by {shift} µs");
        }
    }
}

/// An expired lease row (or token maximum) that does not decode is `Corrupt` to an acquire, as
/// in dotdo-sqlite, and stays as it is: the acquire's SQL read a text token as 0 and issued
/// token 1 again (a token issued before), and took over rows dotdo-sqlite refuses.
#[tokio::test]
async fn an_expired_lease_row_that_does_not_decode_is_corrupt_never_taken_over() {
    let (n1, n2) = (NodeId::new("n1").expect("valid"), NodeId::new("n2").expect("valid"));
    for transport in [Transport::Auto, Transport::Batch] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, _raw, c) = store_and_raw_connection(&dir.path().join("hot.db"), transport).await;
        for (i, (what, damage)) in dotdo_core::testkit::DAMAGED_EXPIRED_LEASE_ROWS.iter().enumerate() {
            let o = ObjectId::new(format!("o{i}")).expect("valid");
            let l = s.acquire(&o, &n1, Duration::from_secs(60)).await.expect("acquire");
            s.put(&o, l.token, "T", "k", "v".into()).await.expect("put");
            c.execute("UPDATE do_locks SET expires_at = 1 WHERE do_id = ?1", [o.as_str()]).await.expect("expire");
            c.execute(damage, [o.as_str()]).await.expect(what);
            let dump = || async {
                let mut rows = c
                    .query(
                        "SELECT quote(node_id) || ' ' || quote(acquired_at) || ' ' || quote(expires_at) || ' ' || \
                         quote(fencing_token) || ' ' || (SELECT quote(max_token) FROM do_objects WHERE do_id = ?1) \
                         FROM do_locks WHERE do_id = ?1",
                        [o.as_str()],
                    )
                    .await
                    .expect("read the rows");
                let row = rows.next().await.expect("row").expect("a lease row");
                row.get::<String>(0).expect("text")
            };
            let before = dump().await;
            let e = s.acquire(&o, &n2, Duration::from_secs(60)).await.expect_err(what);
            assert_eq!(e.kind(), &ErrorKind::Corrupt, "{transport:?}, {what}: {e}");
            assert_eq!(dump().await, before, "{transport:?}, {what}: the damaged row was taken over");
        }
    }
}

/// A predecessor's `do_locks` created without NOT NULL, holding a lease whose expiry is NULL:
/// the lease is `Corrupt` (dotdo-sqlite says the same), never read as free (expiry 0).
#[tokio::test]
async fn a_lease_row_with_a_null_time_is_corrupt_never_a_free_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("legacy.db");
    {
        let raw = libsql::Builder::new_local(&path).build().await.expect("raw open");
        let c = raw.connect().expect("connect");
        c.execute_batch(
            "CREATE TABLE do_locks (do_id TEXT PRIMARY KEY, node_id TEXT, acquired_at INTEGER, expires_at INTEGER,
                fencing_token INTEGER, metadata TEXT);
             INSERT INTO do_locks VALUES ('o1', 'old-node', 0, NULL, 7, NULL);",
        )
        .await
        .expect("predecessor schema");
    }
    let s = LibsqlStore::local(&path).open().await.expect("open");
    let e = s.current(&obj()).await.expect_err("a lease with a NULL expiry");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("expires_at"), "{e}");
}

/// A predecessor's lease row whose token is NULL, and a state row whose sequence number is NULL
/// (tables made without `NOT NULL`), are `Corrupt` to `object_info` and `list`, as in
/// dotdo-sqlite: `object_info` hid the NULL token (read as none), `list` gave the entry seq 0.
#[tokio::test]
async fn a_null_lease_token_or_state_seq_is_corrupt_to_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tables = [
        "CREATE TABLE do_locks (do_id TEXT PRIMARY KEY, node_id TEXT, acquired_at INTEGER, expires_at INTEGER, \
         fencing_token INTEGER, metadata TEXT)",
        "CREATE TABLE do_state (do_id TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, seq INTEGER, \
         UNIQUE (do_id, key))",
    ];
    let (s, _raw, c) = store_over_tables(&dir.path().join("hot.db"), Transport::Auto, &tables).await;
    let p = ObjectId::new("p").expect("id");
    let l = s.acquire(&p, &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
    s.put(&p, l.token, "T", "k", "v".into()).await.expect("put");
    c.execute("UPDATE do_state SET seq = NULL", ()).await.expect("damage");
    let e = s.list(&p, dotdo_core::KeyRange::all(), None).await.expect_err("a NULL is no sequence number");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    c.execute("INSERT INTO do_locks VALUES ('o', 'n', 0, 0, NULL, NULL)", ()).await.expect("a damaged lease row");
    c.execute("INSERT INTO do_objects (do_id, last_seq, truncated_through, max_token) VALUES ('o', 1, 0, 0)", ())
        .await
        .expect("a row of its own");
    let e = s.object_info(&ObjectId::new("o").expect("id")).await.expect_err("a NULL is no token");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
}

/// A file that already has the predecessor's `do_locks` (seed 002) with issued tokens: opening
/// it folds those tokens into dotdo's fencing state, on both transports.
#[tokio::test]
async fn lease_tokens_of_a_predecessor_do_locks_table_fence_writes() {
    for transport in [Transport::Auto, Transport::Batch] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("legacy.db");
        {
            let raw = libsql::Builder::new_local(&path).build().await.expect("raw open");
            let c = raw.connect().expect("connect");
            c.execute_batch(
                "CREATE TABLE do_locks (do_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, acquired_at INTEGER NOT NULL,
                    expires_at INTEGER NOT NULL, fencing_token INTEGER NOT NULL, metadata TEXT);
                 INSERT INTO do_locks VALUES ('user:a', 'old-node', 0, 1, 7, NULL);",
            )
            .await
            .expect("predecessor schema");
        }
        let settings = LibsqlSettings { transport, ..Default::default() };
        let s = LibsqlStore::local(&path).with_settings(settings).open().await.expect("open");
        let a = ObjectId::new("user:a").expect("id");
        let e = s.put(&a, dotdo_core::FencingToken::new(3), "T", "k", b"v".to_vec().into()).await.expect_err("stale");
        assert!(matches!(e.kind(), ErrorKind::Fenced { .. }), "{transport:?}: {e}");
        let l = s.acquire(&a, &NodeId::new("n").expect("valid"), Duration::from_secs(5)).await.expect("acquire");
        assert_eq!(l.token.get(), 8, "{transport:?}");
        s.put(&a, l.token, "T", "k", b"v".to_vec().into()).await.expect("current token");
    }
}

/// Eight writers of one store queued behind another connection's write lock each get a
/// retryable `Unavailable` within about their own budget, not the last one after eight budgets:
/// waiting for the store's write connection counts against the same budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_writers_behind_a_foreign_lock_each_fail_in_bounded_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let settings = LibsqlSettings {
        busy_timeout: Duration::from_millis(150),
        retries: 2,
        retry_backoff: Duration::from_millis(10),
        ..Default::default()
    };
    let s = LibsqlStore::local(&path).with_settings(settings).open().await.expect("open");
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
    let holder_db = libsql::Builder::new_local(&path).build().await.expect("second handle");
    let holder = holder_db.connect().expect("connect");
    holder.execute("BEGIN IMMEDIATE", ()).await.expect("take the write lock");
    // One budget: 3 attempts of 150 ms plus 10 + 20 ms of backoff = 480 ms. Without the bound the
    // last of eight queued writers took about 3.7 s.
    let hot: std::sync::Arc<dyn HotStore> = std::sync::Arc::new(s.clone());
    dotdo_core::testkit::assert_queued_writers_fail_in_bounded_time(hot, &obj(), l.token, Duration::from_millis(480))
        .await;
    holder.execute("COMMIT", ()).await.expect("release");
    s.put(&obj(), l.token, "T", "k", "v".into()).await.expect("writes go through again");
}

/// A write waiting for another connection's write lock while the file is replaced (a restored
/// backup renamed over it) is refused with `Corrupt` once it gets the lock, as in dotdo-sqlite:
/// the file was checked only when the call began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waiting_for_the_lock_while_the_file_is_replaced_is_refused() {
    // Short busy waits, retried (the write lets go of the store's writer between them).
    a_write_waiting_while_the_file_is_replaced(Duration::from_millis(200), 20).await;
}

/// The same with one long busy wait, the store's writer held throughout: the checkpoint round,
/// which waits for the writer, looks at the file meanwhile. It waited blind, never noticed the
/// replaced file, and the write, committed into the old file, answered `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waiting_in_one_long_busy_wait_while_the_file_is_replaced_is_refused() {
    a_write_waiting_while_the_file_is_replaced(Duration::from_secs(60), 0).await;
}

async fn a_write_waiting_while_the_file_is_replaced(busy_timeout: Duration, retries: u32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let settings = LibsqlSettings {
        background_checkpoint: Some(Duration::from_millis(10)),
        busy_timeout,
        retries,
        ..Default::default()
    };
    let s = LibsqlStore::local(&path).with_settings(settings).open().await.expect("open");
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
    let holder_db = libsql::Builder::new_local(&path).build().await.expect("second handle");
    let holder = holder_db.connect().expect("connect");
    holder.execute("BEGIN IMMEDIATE", ()).await.expect("take the write lock");
    dotdo_core::testkit::assert_a_write_waiting_while_the_file_is_replaced_is_refused(&path, s, l, (holder, holder_db))
        .await;
}

/// Reads needing a new connection after the database file was deleted (no background
/// checkpoint to notice) fail as the file cannot be opened (`Unavailable`) and create nothing at
/// its path (the kit's check, as dotdo-sqlite: a reader opened with the create flag made an empty database there and answered `Backend` for its missing tables).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_after_the_file_is_deleted_create_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let settings = LibsqlSettings { background_checkpoint: None, ..Default::default() };
    let s = LibsqlStore::local(&path).with_settings(settings.clone()).open().await.expect("open");
    dotdo_core::testkit::assert_reads_after_the_file_is_deleted_create_nothing(&path, s, settings.read_connections)
        .await;
}

/// Schema versions: a file of version 1 or 2 is upgraded in place (to 3) and keeps its state and
/// its lease; objects ever written and without live keys in a file from before version 3
/// (evicted or emptied, it did not record which) are marked evicted, so they are restored from
/// cold as before (not objects never written: nothing to restore); a file of a newer version
/// than this library's is refused with `Corrupt` and left alone. The marking runs once, by the
/// upgrade that finds the file below version 3 (not again by a store whose upgrade program runs
/// after another process upgraded the file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_schema_versions_upgrade_and_newer_ones_are_refused() {
    async fn raw(p: &std::path::Path) -> libsql::Connection {
        libsql::Builder::new_local(p).build().await.expect("raw open").connect().expect("connect")
    }
    async fn version(p: &std::path::Path) -> i64 {
        let mut rows = raw(p).await.query("PRAGMA user_version", ()).await.expect("user_version");
        rows.next().await.expect("row").expect("one row").get(0).expect("integer")
    }
    async fn set_version(p: &std::path::Path, v: i64) {
        raw(p).await.execute_batch(&format!("PRAGMA user_version = {v}")).await.expect("set user_version");
    }
    /// Open the file while another process holds its write lock and sets version `to`,
    /// committing 300 ms later.
    async fn open_while_upgraded_to(path: &std::path::Path, to: i64) -> dotdo_core::Result<LibsqlStore> {
        let locker = raw(path).await;
        locker.execute_batch(&format!("BEGIN IMMEDIATE; PRAGMA user_version = {to};")).await.expect("lock");
        let opening = tokio::spawn({
            let path = path.to_path_buf();
            async move { LibsqlStore::local(&path).open().await }
        });
        #[allow(clippy::disallowed_methods)] // the other process holds its lock for a while
        tokio::time::sleep(Duration::from_millis(300)).await;
        locker.execute_batch("COMMIT").await.expect("commit");
        opening.await.expect("join")
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let lease = {
        let s = LibsqlStore::local(&path).open().await.expect("open");
        let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(600)).await.expect("acquire");
        s.put(&obj(), l.token, "T", "k", b"v".to_vec().into()).await.expect("put");
        l
    };
    assert_eq!(version(&path).await, 3);
    // A version-2 file (no `do_evicted`) with an object whose live state is gone (evicted, or
    // its keys deleted: version 2 cannot tell).
    let (gone, leased) = (ObjectId::new("gone").expect("valid"), ObjectId::new("leased").expect("valid"));
    let g = {
        let s = LibsqlStore::local(&path).open().await.expect("open");
        let g = s.acquire(&gone, &NodeId::new("n").expect("valid"), Duration::from_secs(600)).await.expect("acquire");
        s.put(&gone, g.token, "T", "k", b"v".to_vec().into()).await.expect("put");
        s.delete(&gone, g.token, "T", "k").await.expect("delete");
        s.truncate_changes(&gone, g.token, 2).await.expect("truncate");
        assert!(s.object_info(&gone).await.expect("info").expect("object").resident, "emptied here");
        // Leased, never written: nothing to restore, so not marked by the upgrade.
        s.acquire(&leased, &NodeId::new("n").expect("valid"), Duration::from_secs(600)).await.expect("acquire");
        g
    };
    raw(&path).await.execute_batch("DROP TABLE do_evicted; PRAGMA user_version = 2;").await.expect("version 2");
    {
        let s = LibsqlStore::local(&path).open().await.expect("open a version-2 file");
        let info = s.object_info(&gone).await.expect("info").expect("object");
        assert!(!info.resident, "no live keys in a version-2 file: maybe evicted: {info:?}");
        assert!(s.object_info(&obj()).await.expect("info").expect("object").resident, "live keys: resident");
        s.restore(&gone, g.token, vec![], 2).await.expect("restore");
        assert!(s.object_info(&gone).await.expect("info").expect("object").resident, "restored");
        let l = s.current(&leased).await.expect("current").expect("the lease");
        s.put(&leased, l.token, "T", "k", b"v".to_vec().into()).await.expect("put");
        s.delete(&leased, l.token, "T", "k").await.expect("delete");
        s.truncate_changes(&leased, l.token, 2).await.expect("truncate");
        let info = s.object_info(&leased).await.expect("info").expect("object");
        assert!(info.resident, "never written before the upgrade: not marked: {info:?}");
    }
    // The upgrade marks once: a store whose upgrade program runs after another process
    // upgraded the file (it read version 2 first) leaves objects emptied since unmarked.
    raw(&path).await.execute_batch("DROP TABLE do_evicted; PRAGMA user_version = 2;").await.expect("version 2");
    let s = LibsqlStore::local(&path).open().await.expect("upgrade again");
    assert!(!s.object_info(&gone).await.expect("info").expect("object").resident, "marked by the upgrade");
    s.restore(&gone, g.token, vec![], 2).await.expect("restore");
    drop(s);
    set_version(&path, 2).await;
    let s = open_while_upgraded_to(&path, 3).await.expect("opens the file another process upgraded meanwhile");
    let info = s.object_info(&gone).await.expect("info").expect("object");
    assert!(info.resident, "emptied and restored since: not marked again: {info:?}");
    drop(s);
    assert_eq!(version(&path).await, 3, "upgraded in place");
    set_version(&path, 1).await;
    {
        let s = LibsqlStore::local(&path).open().await.expect("open a version-1 file");
        assert_eq!(s.get(&obj(), "k").await.expect("get"), Some(b"v".to_vec().into()));
        s.validate(&lease).await.expect("the lease survives the upgrade");
        s.put(&obj(), lease.token, "T", "k2", b"w".to_vec().into()).await.expect("its token still writes");
        let e = s.acquire(&obj(), &NodeId::new("m").expect("valid"), Duration::from_secs(5)).await.expect_err("held");
        assert!(matches!(e.kind(), ErrorKind::LeaseHeld { .. }), "{e}");
    }
    assert_eq!(version(&path).await, 3, "upgraded in place");
    {
        let s = LibsqlStore::local(&path).open().await.expect("open");
        let info = s.object_info(&gone).await.expect("info").expect("object");
        assert!(!info.resident, "a file from before version 3 again: marked, restored from cold: {info:?}");
    }
    set_version(&path, 4).await;
    let e = LibsqlStore::local(&path).open().await.expect_err("a newer file");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("schema version 4"), "{e}");
    assert_eq!(version(&path).await, 4, "a refused file is left alone");

    // The version is decided again under the write lock: a version-1 file that another process
    // upgrades to a newer version while this one waits for the lock is refused, not downgraded.
    set_version(&path, 1).await;
    let e = open_while_upgraded_to(&path, 4).await.expect_err("upgraded to a newer version meanwhile");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert_eq!(version(&path).await, 4, "not downgraded");
}

/// An in-memory libSQL database is refused before anything opens: libsql gives every connection
/// its own, so the store's readers would never see its writes (reads failed with "no such table").
#[tokio::test]
async fn an_in_memory_database_is_refused() {
    for path in [":memory:", "file::memory:?cache=shared"] {
        let e = LibsqlStore::local(path).open().await.expect_err(path);
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{path}: {e}");
    }
}

/// Stored values of the wrong type (a damaged file, another writer) are `Corrupt`, as
/// dotdo-sqlite reports them, not a `Backend` error.
#[tokio::test]
async fn values_of_the_wrong_type_are_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let s = LibsqlStore::local(&path).open().await.expect("open");
    let l = s.acquire(&obj(), &NodeId::new("n1").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
    s.put(&obj(), l.token, "T", "k", bytes::Bytes::from_static(b"v")).await.expect("put");
    let raw = libsql::Builder::new_local(&path).build().await.expect("raw open");
    let c = raw.connect().expect("connect");
    c.execute("UPDATE do_state SET seq = 'x'", ()).await.expect("damage the state");
    let e = s.list(&obj(), dotdo_core::KeyRange::all(), None).await.expect_err("list");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    c.execute("UPDATE do_objects SET max_token = 'x'", ()).await.expect("damage the token floor");
    let e = s.put(&obj(), l.token, "T", "k2", bytes::Bytes::from_static(b"v")).await.expect_err("put");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    // Negative sequence numbers (no value dotdo writes): Corrupt and nothing written, as
    // dotdo-sqlite reads the same rows (the write committed, then read as "fenced").
    c.execute_batch(&format!(
        "UPDATE do_objects SET max_token = {}, last_seq = -5; UPDATE do_changes SET seq = -5; UPDATE do_state SET seq = 1",
        l.token.get()
    ))
    .await
    .expect("negative sequence numbers");
    let e = s.put(&obj(), l.token, "T", "k3", bytes::Bytes::from_static(b"v")).await.expect_err("put");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    let mut rows = c.query("SELECT count(*) FROM do_changes WHERE key = 'k3'", ()).await.expect("count");
    let written: i64 = rows.next().await.expect("row").expect("one").get(0).expect("int");
    assert_eq!(written, 0, "nothing of the refused put is in the log");
}

/// A local store used inside a `LocalSet` on a multi-threaded runtime, where tokio refuses
/// `block_in_place`: calls run inline instead of panicking.
#[test]
fn a_local_store_in_a_local_set_is_not_a_panic() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(tokio::task::LocalSet::new().run_until(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = LibsqlStore::local(dir.path().join("h.db")).open().await.expect("open in a LocalSet");
        let l = s.acquire(&obj(), &NodeId::new("n").expect("node"), Duration::from_secs(5)).await.expect("acquire");
        s.put(&obj(), l.token, "T", "k", b"v".to_vec().into()).await.expect("put");
        assert_eq!(s.get(&obj(), "k").await.expect("get").as_deref(), Some(&b"v"[..]));
    }));
}

/// Paths libsql would mishandle are refused up front: a NUL byte (libsql panicked on it), a
/// path that is not UTF-8, and
/// `file:` with no path (a private temporary database per connection, so readers never saw what
/// was written); a relative `file:` URI opens like a plain relative path.
#[tokio::test]
async fn bad_local_paths_are_refused_and_relative_uris_work() {
    for bad in ["hot\0.db", "file:", "file:?cache=private"] {
        let e = LibsqlStore::local(bad).open().await.expect_err(bad);
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{bad:?}: {e}");
    }
    // A path that is not UTF-8 (libsql opens only UTF-8 paths: it failed as `Backend`).
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = dir.path().join(std::ffi::OsStr::from_bytes(b"\xff.db"));
        let e = LibsqlStore::local(&bad).open().await.expect_err("not UTF-8");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cwd = std::env::current_dir().expect("cwd");
    let rel = pathdiff(dir.path(), &cwd).join("h.db");
    let s = LibsqlStore::local(format!("file:{}", rel.display())).open().await.expect("a relative file: URI");
    let l = s.acquire(&obj(), &NodeId::new("n").expect("node"), Duration::from_secs(5)).await.expect("acquire");
    s.put(&obj(), l.token, "T", "k", b"v".to_vec().into()).await.expect("put");
    assert_eq!(s.get(&obj(), "k").await.expect("get").as_deref(), Some(&b"v"[..]));
    assert!(dir.path().join("h.db").exists(), "the file is where the relative URI says");
}

/// `to` as a path relative to `from` (both absolute).
fn pathdiff(to: &std::path::Path, from: &std::path::Path) -> std::path::PathBuf {
    let (to, from): (Vec<_>, Vec<_>) = (to.components().collect(), from.components().collect());
    let common = to.iter().zip(&from).take_while(|(a, b)| a == b).count();
    let mut out = std::path::PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c.as_os_str());
    }
    out
}

/// Another application's database (user_version 0, tables of its own) is refused and left
/// untouched; one claiming dotdo's version without dotdo's tables is `Corrupt` (as on
/// dotdo-sqlite: the schema is shared).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_applications_database_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("app.db");
    let db = libsql::Builder::new_local(&path).build().await.expect("raw");
    let raw = db.connect().expect("connect");
    raw.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)", ()).await.expect("app schema");
    let e = LibsqlStore::local(&path).open().await.expect_err("another application's file");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("users"), "{e}");
    let mut rows = raw
        .query("SELECT (SELECT user_version FROM pragma_user_version), (SELECT count(*) FROM sqlite_master WHERE name LIKE 'do%')", ())
        .await
        .expect("read");
    let row = rows.next().await.expect("row").expect("one row");
    assert_eq!((row.get::<i64>(0).expect("v"), row.get::<i64>(1).expect("n")), (0, 0), "the file was changed");
    drop(rows);
    // Not even switched to WAL (header bytes 18 and 19: 1 in a rollback journal, 2 in WAL).
    let header = |p: &std::path::Path| std::fs::read(p).expect("file")[18..20].to_vec();
    assert_eq!(header(&path), [1, 1], "the journal mode was changed");
    // An application's own migrations set user_version too, also past dotdo's.
    for v in [1, 2, 7] {
        raw.execute(&format!("PRAGMA user_version = {v}"), ()).await.expect("version");
        let e = LibsqlStore::local(&path).open().await.expect_err("another application's file");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "version {v}: {e}");
        assert!(e.to_string().contains("users"), "{e}");
        assert_eq!(header(&path), [1, 1], "the journal mode was changed");
    }
    // A file at dotdo's version with some of its tables only.
    let path = dir.path().join("part.db");
    let db = libsql::Builder::new_local(&path).build().await.expect("raw");
    let raw = db.connect().expect("connect");
    raw.execute_batch(
        "CREATE TABLE do_locks (do_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, acquired_at INTEGER NOT NULL, \
         expires_at INTEGER NOT NULL, fencing_token INTEGER NOT NULL); PRAGMA user_version = 2;",
    )
    .await
    .expect("part of the schema");
    let e = LibsqlStore::local(&path).open().await.expect_err("dotdo tables missing");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("do_objects"), "{e}");
    // A version-0 file with a dotdo table of other columns: refused before anything is written
    // (the upgrade used to commit, claiming the file, and only then report it).
    let path = dir.path().join("odd.db");
    let db = libsql::Builder::new_local(&path).build().await.expect("raw");
    let raw = db.connect().expect("connect");
    raw.execute("CREATE TABLE do_state (do_id TEXT, key TEXT, value BLOB)", ()).await.expect("odd table");
    let e = LibsqlStore::local(&path).open().await.expect_err("a column missing");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert_eq!(version_and_dotdo_tables(&raw).await, (0, 1), "the file was changed");
    // A dotdo file whose state table lost its unique key (rebuilt by hand): every put would fail
    // with an SQL error (its `ON CONFLICT` has no key to match), so the open refuses it.
    let path = dir.path().join("nokey.db");
    drop(LibsqlStore::local(&path).open().await.expect("create"));
    let db = libsql::Builder::new_local(&path).build().await.expect("raw");
    let raw = db.connect().expect("connect");
    raw.execute_batch(
        "DROP TABLE do_state; CREATE TABLE do_state (do_id TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, \
         seq INTEGER NOT NULL);",
    )
    .await
    .expect("rebuilt without its key");
    let e = LibsqlStore::local(&path).open().await.expect_err("no unique key");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("do_state") && e.to_string().contains("unique key"), "{e}");
    // The predecessor's lease table without a key on do_id (version 0): refused before the
    // upgrade commits, the file left unclaimed.
    let path = dir.path().join("keyless-predecessor.db");
    let db = libsql::Builder::new_local(&path).build().await.expect("raw");
    let raw = db.connect().expect("connect");
    raw.execute(
        "CREATE TABLE do_locks (do_id TEXT NOT NULL, node_id TEXT NOT NULL, acquired_at INTEGER NOT NULL, \
         expires_at INTEGER NOT NULL, fencing_token INTEGER NOT NULL)",
        (),
    )
    .await
    .expect("keyless lease table");
    let e = LibsqlStore::local(&path).open().await.expect_err("no unique key");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert_eq!(version_and_dotdo_tables(&raw).await, (0, 1), "the file was claimed");
}

/// A database's `user_version` and how many of its tables' names start with `do`.
async fn version_and_dotdo_tables(raw: &libsql::Connection) -> (i64, i64) {
    let mut rows = raw
        .query("SELECT (SELECT user_version FROM pragma_user_version), (SELECT count(*) FROM sqlite_master WHERE name LIKE 'do%')", ())
        .await
        .expect("read");
    let row = rows.next().await.expect("row").expect("one row");
    (row.get::<i64>(0).expect("v"), row.get::<i64>(1).expect("n"))
}

/// A database that cannot be put in WAL mode (a VFS without shared memory) is refused, as by
/// dotdo-sqlite: it would run with a rollback journal and `synchronous=NORMAL`, which can corrupt
/// the file on power loss. Before, the open succeeded silently. It is left untouched: the
/// schema was written (and committed) before the WAL switch was refused.
#[tokio::test]
async fn a_database_that_cannot_use_wal_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let uri = format!("file:{}?vfs=unix-dotfile", path.display());
    let e = LibsqlStore::local(&uri).open().await.expect_err("no WAL");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("WAL"), "{e}");
    let db = libsql::Builder::new_local(&path).build().await.expect("raw");
    let raw = db.connect().expect("connect");
    let mut rows = raw
        .query("SELECT (SELECT user_version FROM pragma_user_version), (SELECT count(*) FROM sqlite_master)", ())
        .await
        .expect("read");
    let row = rows.next().await.expect("row").expect("one row");
    assert_eq!(
        (row.get::<i64>(0).expect("v"), row.get::<i64>(1).expect("n")),
        (0, 0),
        "nothing of dotdo's schema was written"
    );
}

/// A wall clock that reads `base - 10 µs` and `base + 10 µs` in turn once `flipping` is set,
/// and `base` before (monotonic time and sleeps are a manual clock's).
#[derive(Debug)]
struct FlippingClock {
    base: std::sync::atomic::AtomicI64,
    flipping: std::sync::atomic::AtomicBool,
    reads: AtomicUsize,
    inner: dotdo_core::ManualClock,
}

impl Clock for FlippingClock {
    fn now(&self) -> dotdo_core::Timestamp {
        let base = self.base.load(Ordering::SeqCst);
        if !self.flipping.load(Ordering::SeqCst) {
            return dotdo_core::Timestamp::from_micros(base);
        }
        let odd = self.reads.fetch_add(1, Ordering::SeqCst) % 2 == 1;
        dotdo_core::Timestamp::from_micros(if odd { base + 10 } else { base - 10 })
    }
    fn monotonic(&self) -> Duration {
        self.inner.monotonic()
    }
    fn sleep(&self, duration: Duration) -> dotdo_core::time::Sleep {
        self.inner.sleep(duration)
    }
}

/// An acquire refused because the lease is held is explained at the time the refusal was
/// decided by: with a later time (a lease running out in between, or a wall clock stepped back
/// and forth), the explanation read the lease as free, tried again, and after four such tries
/// answered `Corrupt` for a healthy file. `LeaseHeld` naming the holder.
#[tokio::test]
async fn an_acquire_refused_as_held_is_explained_at_its_own_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(FlippingClock {
        base: dotdo_core::testkit::KIT_EPOCH.as_micros().into(),
        flipping: false.into(),
        reads: AtomicUsize::new(0),
        inner: dotdo_core::ManualClock::new(dotdo_core::testkit::KIT_EPOCH),
    });
    let s = LibsqlStore::local(dir.path().join("a.db")).with_clock(clock.clone()).open().await.expect("open");
    let b = NodeId::new("b").expect("node");
    let held = s.acquire(&obj(), &b, Duration::from_secs(5)).await.expect("b takes the lease");
    // From here the clock reads 10 µs before and after b's expiry in turn.
    clock.base.store(held.expires_at.as_micros(), Ordering::SeqCst);
    clock.flipping.store(true, Ordering::SeqCst);
    let e = s.acquire(&obj(), &NodeId::new("a").expect("node"), Duration::from_secs(5)).await.expect_err("held");
    match e.kind() {
        ErrorKind::LeaseHeld { holder, .. } => assert_eq!(holder, &b, "{e}"),
        other => panic!("expected LeaseHeld, got {other:?}: {e}"),
    }
}

/// A write that waits out a lock held by another connection (in SQLite's busy wait: one attempt,
/// no retries) records the time it commits, not the time it was called: read before the wait, a
/// change committed after another carried an earlier time than it (here 10 s earlier).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_waited_for_a_lock_is_stamped_when_it_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let clock = Arc::new(dotdo_core::ManualClock::new(dotdo_core::testkit::KIT_EPOCH));
    let settings = LibsqlSettings { busy_timeout: Duration::from_secs(20), ..fast_retries(0) };
    let s = LibsqlStore::local(&path).with_settings(settings).with_clock(clock.clone()).open().await.expect("open");
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
    let db = libsql::Builder::new_local(&path).build().await.expect("raw");
    let blocker = db.connect().expect("connect");
    blocker.execute("BEGIN EXCLUSIVE", ()).await.expect("lock");
    let unlock = async move {
        blocker.execute("ROLLBACK", ()).await.expect("unlock");
    };
    dotdo_core::testkit::assert_a_write_waiting_for_a_lock_is_stamped_when_it_commits(s, l, &clock, unlock).await;
}

/// A write on a local file whose clock panics inside its transaction leaves no transaction
/// open: another connection gets the file's write lock at once (it waited for this store's next
/// write, which never came).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_clock_inside_a_write_leaves_the_database_unlocked() {
    use dotdo_core::testkit::PanickingClock;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let clock = Arc::new(PanickingClock::new(dotdo_core::ManualClock::new(dotdo_core::testkit::KIT_EPOCH)));
    let s = LibsqlStore::local(&path).with_clock(clock.clone()).open().await.expect("open");
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
    clock.set_panicking(true);
    let writer = {
        let s = s.clone();
        tokio::spawn(async move { s.put(&obj(), l.token, "T", "k", "v".into()).await })
    };
    assert!(writer.await.expect_err("the clock panicked").is_panic());
    let db = libsql::Builder::new_local(&path).build().await.expect("raw");
    let other = db.connect().expect("connect");
    other.busy_timeout(Duration::from_millis(200)).expect("busy timeout");
    other.execute("BEGIN IMMEDIATE", ()).await.expect("the write lock is free");
    other.execute("ROLLBACK", ()).await.expect("rollback");
    clock.set_panicking(false);
    s.put(&obj(), l.token, "T", "k", "v2".into()).await.expect("the store writes on");
    assert_eq!(s.get(&obj(), "k").await.expect("get").expect("value").as_ref(), b"v2");
}
