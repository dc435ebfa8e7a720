//! The Cloudflare Pipelines stream client against a local HTTP server that speaks the stream
//! endpoint's protocol (POST a JSON array, Bearer token, 2xx accepted, 408/429/5xx transient, 3xx refused,
//! 401 bad token, 413 too large).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dotdo_core::{ErrorKind, ObjectId, Timestamp};
use dotdo_pipelines::cloudflare::{encode, CloudflareSettings, CloudflareStreamClient, PartialSend};
use dotdo_pipelines::Event;
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Default)]
struct Server {
    records: Mutex<Vec<serde_json::Value>>,
    requests: AtomicU32,
    fail_next: AtomicU32,
    /// `Retry-After` sent with the failures of `fail_next`.
    retry_after: Mutex<Option<String>>,
    redirect_next: AtomicU32,
    /// A status line (e.g. `"429 Too Many Requests"`) answered to the next requests instead.
    status_next: Mutex<Vec<&'static str>>,
    /// The body of those answers (`{"success":false}` if none).
    status_body: Mutex<Option<String>>,
    /// Requests taken (their records kept) whose connection is then closed with no reply.
    drop_next: AtomicU32,
    /// Requests taken (their records kept) that are then never answered, the connection left
    /// open (a server that hangs after reading the request).
    silent_next: AtomicU32,
    /// Every request line and whether it carried an `authorization` header, in order.
    seen: Mutex<Vec<(String, bool)>>,
    /// Requests taken whose answer says one record fewer was committed.
    short_next: AtomicU32,
    max_body: usize,
    /// From the request after this many (0: never), bodies over `small_body` are too large.
    small_after: u32,
    small_body: usize,
}

async fn serve(server: Arc<Server>, token: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { return };
            let server = server.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut len = 0usize;
                    let mut auth = String::new();
                    let mut content_type = String::new();
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).await.expect("header");
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        let (k, v) = h.split_once(':').expect("header line");
                        match k.to_ascii_lowercase().as_str() {
                            "content-length" => len = v.trim().parse().expect("length"),
                            "authorization" => auth = v.trim().to_string(),
                            "content-type" => content_type = v.trim().to_ascii_lowercase(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0u8; len];
                    r.read_exact(&mut body).await.expect("body");
                    server.requests.fetch_add(1, Ordering::SeqCst);
                    server.seen.lock().push((line.trim_end().to_string(), !auth.is_empty()));
                    if server.silent_next.load(Ordering::SeqCst) > 0 {
                        server.silent_next.fetch_sub(1, Ordering::SeqCst);
                        if let Ok(items) = serde_json::from_slice::<Vec<serde_json::Value>>(&body) {
                            server.records.lock().extend(items);
                        }
                        // Keeps the connection open and answers nothing.
                        #[allow(clippy::disallowed_methods)] // a server's real wait
                        tokio::time::sleep(Duration::from_secs(120)).await;
                        return;
                    }
                    let mut location = String::new();
                    let (status, reply) = if line.starts_with("GET /moved") {
                        // What a misconfigured proxy's target might answer to the GET a followed
                        // redirect turns the POST into.
                        ("200 OK", "{}".to_string())
                    } else if !line.starts_with("POST ") {
                        ("405 Method Not Allowed", "{}".to_string())
                    } else if server.redirect_next.load(Ordering::SeqCst) > 0 {
                        server.redirect_next.fetch_sub(1, Ordering::SeqCst);
                        location = "location: /moved\r\n".to_string();
                        ("302 Found", "{}".to_string())
                    } else if auth != format!("Bearer {token}") {
                        ("401 Unauthorized", r#"{"success":false,"errors":[{"message":"Unauthorized"}]}"#.to_string())
                    } else if len > server.max_body
                        || (server.small_after > 0
                            && server.requests.load(Ordering::SeqCst) > server.small_after
                            && len > server.small_body)
                    {
                        ("413 Payload Too Large", "{}".to_string())
                    } else if server.drop_next.load(Ordering::SeqCst) > 0 {
                        server.drop_next.fetch_sub(1, Ordering::SeqCst);
                        let items: Vec<serde_json::Value> = serde_json::from_slice(&body).expect("a JSON array");
                        server.records.lock().extend(items);
                        return;
                    } else if let Some(status) = server.status_next.lock().pop() {
                        let body = server.status_body.lock().clone();
                        (status, body.unwrap_or_else(|| r#"{"success":false}"#.to_string()))
                    } else if server.fail_next.load(Ordering::SeqCst) > 0 {
                        server.fail_next.fetch_sub(1, Ordering::SeqCst);
                        if let Some(after) = server.retry_after.lock().clone() {
                            location = format!("retry-after: {after}\r\n");
                        }
                        ("503 Service Unavailable", "{}".to_string())
                    } else {
                        // The endpoint takes arrays of JSON objects sent as JSON; anything else
                        // is an error answer, not a panic of this server.
                        let items = serde_json::from_slice::<Vec<serde_json::Value>>(&body)
                            .ok()
                            .filter(|items| items.iter().all(|i| i.is_object()))
                            .filter(|_| content_type.starts_with("application/json"));
                        match items {
                            Some(items) => {
                                let mut n = items.len();
                                server.records.lock().extend(items);
                                if server.short_next.load(Ordering::SeqCst) > 0 {
                                    server.short_next.fetch_sub(1, Ordering::SeqCst);
                                    n -= 1;
                                }
                                ("200 OK", format!(r#"{{"success":true,"result":{{"committed":{n}}}}}"#))
                            }
                            None => ("400 Bad Request", r#"{"success":false}"#.to_string()),
                        }
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\n{location}content-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                        reply.len()
                    );
                    if w.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}/")
}

fn events(n: usize, value_len: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            Event::new(
                ObjectId::new(format!("do-{}", i % 5)).expect("valid"),
                "User",
                format!("k{i}"),
                format!("{{\"pad\":\"{}\"}}", "x".repeat(value_len)),
                Timestamp::from_millis(1_700_000_000_000 + i as i64),
            )
        })
        .collect()
}

/// A request the stream read and never answered (a timeout after sending) may have been taken:
/// `AmbiguousOutcome`, with retries and without, never `Unavailable` ("none taken"), which a
/// caller would answer by sending the events again.
#[tokio::test]
async fn a_request_never_answered_has_an_unknown_outcome() {
    let server = Arc::new(Server { max_body: 64 * 1024, ..Default::default() });
    let url = serve(server.clone(), "t").await;
    for max_retries in [0, 1] {
        server.silent_next.store(max_retries + 1, Ordering::SeqCst);
        let s = CloudflareSettings { timeout: Duration::from_secs(2), max_retries, ..settings() };
        let client = CloudflareStreamClient::new(&url, Some("t".into()), s).expect("client");
        let e = client.send(&events(2, 10)).await.expect_err("never answered");
        assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "max_retries {max_retries}: {e}");
        assert!(!server.records.lock().is_empty(), "the stream read the request");
        server.records.lock().clear();
    }
}

/// The endpoint's path is posted to as given (Cloudflare's stream endpoints carry one, e.g.
/// `/v1`), with no `authorization` header when no token is configured; every record has the
/// seed's five fields and no other.
#[tokio::test]
async fn the_endpoints_path_is_kept_and_no_token_sends_no_header() {
    let server = Arc::new(Server { max_body: 64 * 1024, ..Default::default() });
    let url = serve(server.clone(), "").await;
    let client = CloudflareStreamClient::new(&format!("{url}v1/ingest"), None, settings()).expect("client");
    // The test server checks `Bearer <token>`: with no token configured it takes no header at
    // all (`auth` empty equals `Bearer ` only if a header was sent), so look at what arrived.
    let _ = client.send(&events(3, 10)).await;
    let seen = server.seen.lock().clone();
    assert_eq!(seen.first().map(|(l, _)| l.as_str()), Some("POST /v1/ingest HTTP/1.1"), "{seen:?}");
    assert!(seen.iter().all(|(_, auth)| !auth), "no authorization header without a token: {seen:?}");
    server.seen.lock().clear();
    let with_token = serve(server.clone(), "t").await;
    let client = CloudflareStreamClient::new(&with_token, Some("t".into()), settings()).expect("client");
    client.send(&events(7, 10)).await.expect("send");
    assert_eq!(server.records.lock().len(), 7);
    for r in server.records.lock().iter() {
        let o = r.as_object().expect("an object");
        let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["do_id", "key", "timestamp", "type", "value"], "{r}");
        assert!(o["value"].is_string() && o["timestamp"].is_i64(), "{r}");
    }
}

fn settings() -> CloudflareSettings {
    CloudflareSettings { max_request_bytes: 64 * 1024, backoff: Duration::from_millis(5), ..Default::default() }
}

#[tokio::test]
async fn batches_are_split_by_size_and_arrive_in_the_seed_shape() {
    let server = Arc::new(Server { max_body: 64 * 1024, ..Default::default() });
    let url = serve(server.clone(), "secret-token").await;
    let client = CloudflareStreamClient::new(&url, Some("secret-token".into()), settings()).expect("client");
    let r = client.send(&events(500, 300)).await.expect("send");
    assert_eq!(r.events, 500);
    assert!(r.requests >= 3, "~170 KB must be split into several requests of at most 64 KB, got {}", r.requests);
    let recs = server.records.lock();
    assert_eq!(recs.len(), 500);
    let first = &recs[0];
    assert_eq!(first["do_id"], "do-0");
    assert_eq!(first["type"], "User");
    assert_eq!(first["key"], "k0");
    assert_eq!(first["timestamp"], 1_700_000_000_000i64);
    assert!(first["value"].as_str().expect("value is the JSON text").starts_with("{\"pad\""));
    assert!(!format!("{client:?}").contains("secret-token"), "token redacted in Debug");
}

#[tokio::test]
async fn transient_failures_are_retried_and_bad_tokens_are_not() {
    let server = Arc::new(Server { max_body: 64 * 1024, ..Default::default() });
    let url = serve(server.clone(), "good").await;
    server.fail_next.store(3, Ordering::SeqCst);
    let client = CloudflareStreamClient::new(&url, Some("good".into()), settings()).expect("client");
    let r = client.send(&events(10, 10)).await.expect("retried through three 503s");
    assert_eq!((r.events, r.retries), (10, 3));
    server.fail_next.store(100, Ordering::SeqCst);
    let e = client.send(&events(1, 10)).await.expect_err("retries exhausted");
    assert_eq!(e.kind(), &ErrorKind::Unavailable);
    assert!(e.is_retryable());
    server.fail_next.store(0, Ordering::SeqCst);
    let before = server.requests.load(Ordering::SeqCst);
    let bad = CloudflareStreamClient::new(&url, Some("wrong".into()), settings()).expect("client");
    let e = bad.send(&events(1, 10)).await.expect_err("401");
    assert_eq!(e.kind(), &ErrorKind::Backend);
    assert!(!e.is_retryable());
    assert_eq!(server.requests.load(Ordering::SeqCst), before + 1, "a bad token is not retried");
}

/// A request whose reply is lost (the connection closed after the stream took the records) or
/// that meets a gateway error is retried, but when retries run out the failure is
/// `AmbiguousOutcome` (the events may be there), not "unreachable": a caller resending them
/// knows it may duplicate them. Failures that say nothing was taken (503s, a refused connection)
/// stay `Unavailable`.
#[tokio::test]
async fn lost_replies_and_gateway_errors_are_ambiguous_not_unreachable() {
    let server = Arc::new(Server { max_body: 64 * 1024, ..Default::default() });
    let url = serve(server.clone(), "t").await;
    let s = CloudflareSettings { max_retries: 2, ..settings() };
    let client = CloudflareStreamClient::new(&url, Some("t".into()), s).expect("client");
    // Taken, reply lost, then retries answered 503: the events are there once.
    server.drop_next.store(1, Ordering::SeqCst);
    server.fail_next.store(5, Ordering::SeqCst);
    let e = client.send(&events(2, 10)).await.expect_err("retries run out");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
    assert!(e.is_retryable(), "{e}");
    assert_eq!(server.records.lock().len(), 2, "the first attempt was taken");
    // A lost reply whose retry succeeds: delivered twice (at least once), and Ok.
    server.records.lock().clear();
    server.fail_next.store(0, Ordering::SeqCst);
    server.drop_next.store(1, Ordering::SeqCst);
    let r = client.send(&events(2, 10)).await.expect("the retry is answered");
    assert_eq!((r.events, r.retries), (2, 1));
    assert_eq!(server.records.lock().len(), 4, "at least once: the lost attempt's records stay");
    // Server and gateway errors throughout (Cloudflare's 520 "unknown" and 524 "the origin
    // timed out" among them): the request may have been taken.
    for status in
        ["500 Internal Server Error", "502 Bad Gateway", "504 Gateway Timeout", "520 Unknown", "524 A Timeout"]
    {
        for _ in 0..6 {
            server.status_next.lock().push(status);
        }
        let e = client.send(&events(1, 10)).await.expect_err(status);
        assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{status}: {e}");
        assert!(e.is_retryable(), "{status}: {e}");
        server.status_next.lock().clear();
    }
    // 503s throughout: refused, nothing taken; so for Cloudflare's edge not reaching the origin.
    server.fail_next.store(5, Ordering::SeqCst);
    let e = client.send(&events(1, 10)).await.expect_err("503s");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    server.fail_next.store(0, Ordering::SeqCst);
    for _ in 0..6 {
        server.status_next.lock().push("523 Origin Is Unreachable");
    }
    let e = client.send(&events(1, 10)).await.expect_err("523s");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    // 522 is also what Cloudflare answers when the origin did not acknowledge a request it was
    // sent: the records may be there.
    server.status_next.lock().clear();
    for _ in 0..6 {
        server.status_next.lock().push("522 Connection Timed Out");
    }
    let e = client.send(&events(1, 10)).await.expect_err("522s");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
    server.status_next.lock().clear();
    // An answer committing fewer records than sent: some may be there, and no retry tells.
    let before = server.requests.load(Ordering::SeqCst);
    server.short_next.store(1, Ordering::SeqCst);
    let e = client.send(&events(3, 10)).await.expect_err("2 of 3 committed");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
    assert!(!e.is_retryable(), "{e}");
    assert_eq!(server.requests.load(Ordering::SeqCst), before + 1, "not sent again");
    // No stream at the endpoint: NotFound, not retried.
    let before = server.requests.load(Ordering::SeqCst);
    server.status_next.lock().push("404 Not Found");
    let e = client.send(&events(1, 10)).await.expect_err("404");
    assert_eq!(e.kind(), &ErrorKind::NotFound, "{e}");
    assert_eq!(server.requests.load(Ordering::SeqCst), before + 1, "not sent again");
    server.fail_next.store(0, Ordering::SeqCst);
    // Taken and its reply lost, then refused for good (400): ambiguous, and not retryable.
    server.drop_next.store(1, Ordering::SeqCst);
    server.status_next.lock().push("400 Bad Request");
    let e = client.send(&events(1, 10)).await.expect_err("400 after a lost reply");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
    assert!(!e.is_retryable(), "the last answer says no retry can succeed: {e}");
    // Taken and its reply lost, then 413: the request is split, and when its halves fail the
    // failure still says the events may be there (the halves knew nothing of the lost reply).
    server.drop_next.store(1, Ordering::SeqCst);
    server.status_next.lock().push("413 Payload Too Large");
    server.fail_next.store(100, Ordering::SeqCst);
    let e = client.send(&events(4, 10)).await.expect_err("halves refused");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
    server.fail_next.store(0, Ordering::SeqCst);
}

/// A 2xx whose JSON body says the events were not taken (`"success": false`) is an error, not
/// every event accepted (a misrouted endpoint answering 200 lost them silently); nothing is
/// counted as accepted.
#[tokio::test]
async fn a_2xx_that_says_success_false_is_not_an_acceptance() {
    let server = Arc::new(Server { max_body: 64 * 1024, ..Default::default() });
    let url = serve(server.clone(), "t").await;
    let client = CloudflareStreamClient::new(&url, Some("t".into()), settings()).expect("client");
    server.status_next.lock().push("200 OK");
    let e = client.send(&events(2, 10)).await.expect_err("success: false");
    assert_eq!(e.kind(), &ErrorKind::Backend, "{e}");
    assert!(!e.is_retryable(), "{e}");
    assert!(PartialSend::of(&e).is_none(), "nothing counted as accepted: {e}");
    let r = client.send(&events(2, 10)).await.expect("an ordinary acceptance");
    assert_eq!(r.events, 2);
    // A refusal whose body is longer than the part read (its errors listed at length): still a
    // refusal, not an acceptance of a body that did not parse.
    let long = format!(r#"{{"success" : false,"errors":[{{"message":"{}"}}]}}"#, "x".repeat(8000));
    *server.status_body.lock() = Some(long);
    server.status_next.lock().push("200 OK");
    let e = client.send(&events(2, 10)).await.expect_err("success: false, at length");
    assert_eq!(e.kind(), &ErrorKind::Backend, "{e}");
    *server.status_body.lock() = None;
    // After an attempt whose reply was lost, the same answer leaves the events' fate unknown.
    server.drop_next.store(1, Ordering::SeqCst);
    server.status_next.lock().push("200 OK");
    let e = client.send(&events(2, 10)).await.expect_err("success: false after a lost reply");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
}

/// An event too large for the endpoint alone, after an attempt of the request that held it may
/// have been taken (a gateway error), is `AmbiguousOutcome` (it may be delivered already), with
/// the size refusal as its source: it was `LimitExceeded`, read as "nothing of it was sent".
#[tokio::test]
async fn an_event_too_large_after_an_uncertain_attempt_is_ambiguous() {
    let server = Arc::new(Server { max_body: 64 * 1024, small_after: 1, small_body: 1000, ..Default::default() });
    let url = serve(server.clone(), "t").await;
    let client = CloudflareStreamClient::new(&url, Some("t".into()), settings()).expect("client");
    let mut evs = events(1, 10);
    evs.extend(events(1, 1500));
    server.status_next.lock().push("502 Bad Gateway");
    let e = client.send(&evs).await.expect_err("the second event is too large alone");
    assert_eq!(e.kind(), &ErrorKind::AmbiguousOutcome, "{e}");
    assert_eq!(PartialSend::of(&e).map(|p| p.report.events), Some(1), "the first event was accepted: {e}");
}

/// A 503 with `Retry-After` is retried no sooner than it asks (the backoff here is 5 ms); one
/// asking for more than `MAX_RETRY_AFTER` fails the send at once, retryable, and says so.
#[tokio::test]
async fn retry_after_is_honoured_and_a_long_one_is_left_to_the_caller() {
    use dotdo_core::Clock;
    let server = Arc::new(Server { max_body: 64 * 1024, ..Default::default() });
    let url = serve(server.clone(), "good").await;
    let client = CloudflareStreamClient::new(&url, Some("good".into()), settings()).expect("client");
    *server.retry_after.lock() = Some("1".into());
    server.fail_next.store(1, Ordering::SeqCst);
    let clock = dotdo_core::SystemClock::new();
    let started = clock.monotonic();
    let r = client.send(&events(3, 10)).await.expect("retried after the pause asked for");
    assert!(clock.monotonic() - started >= Duration::from_secs(1), "retried before Retry-After");
    assert_eq!((r.events, r.retries), (3, 1));
    *server.retry_after.lock() = Some("3600".into());
    server.fail_next.store(1, Ordering::SeqCst);
    let before = server.requests.load(Ordering::SeqCst);
    let e = client.send(&events(1, 10)).await.expect_err("an hour is the caller's to wait");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
    assert!(e.to_string().contains("retry after"), "{e}");
    assert_eq!(server.requests.load(Ordering::SeqCst), before + 1, "not asked again within the call");
    // The HTTP-date form is ignored: the backoff applies (read as a date, this one would be
    // far past `MAX_RETRY_AFTER` and fail the send).
    *server.retry_after.lock() = Some("Fri, 01 Jan 2100 00:00:00 GMT".into());
    server.fail_next.store(1, Ordering::SeqCst);
    assert_eq!(client.send(&events(1, 10)).await.expect("after the backoff").retries, 1);
}

#[tokio::test]
async fn size_limits_unreachable_endpoints_and_bad_urls() {
    let server = Arc::new(Server { max_body: 2048, ..Default::default() });
    let url = serve(server.clone(), "t").await;
    let client = CloudflareStreamClient::new(&url, Some("t".into()), settings()).expect("client");
    let e = client.send(&events(1, 70_000)).await.expect_err("one event over the limit");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    let e = client.send(&events(1, 4000)).await.expect_err("server says 413");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    // An `https://` endpoint whose server speaks no TLS: the TLS client refuses it, a
    // configuration error tried once (it was a retryable `Unavailable`, tried `max_retries`
    // times on every send).
    let plain = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let plain_port = plain.local_addr().expect("addr").port();
    let hellos = Arc::new(AtomicU64::new(0));
    let seen = hellos.clone();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in plain.incoming() {
            let Ok(mut conn) = conn else { return };
            seen.fetch_add(1, Ordering::SeqCst);
            let _ = conn.read(&mut [0u8; 1024]);
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    let s = CloudflareSettings { max_retries: 2, ..settings() };
    let c = CloudflareStreamClient::new(&format!("https://127.0.0.1:{plain_port}/"), None, s).expect("client");
    let e = c.send(&events(1, 10)).await.expect_err("no TLS there");
    assert_eq!((e.kind(), e.is_retryable()), (&ErrorKind::InvalidInput, false), "{e}");
    assert_eq!(hellos.load(Ordering::SeqCst), 1, "tried once");
    // A closed port on loopback: retryable Unavailable after bounded retries.
    let (_refusing, port) = dotdo_core::testkit::refused_port();
    let s = CloudflareSettings { max_retries: 2, ..settings() };
    let c = CloudflareStreamClient::new(&format!("http://127.0.0.1:{port}/"), None, s).expect("client");
    let e = c.send(&events(1, 10)).await.expect_err("unreachable");
    assert_eq!(e.kind(), &ErrorKind::Unavailable);
    // A token goes over plain http only to this machine.
    for plain in ["http://stream.example.com/", "http://10.0.0.1:8080/", "http://[fe80::1]/"] {
        let e = CloudflareStreamClient::new(plain, Some("tok".into()), settings()).expect_err(plain);
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
        CloudflareStreamClient::new(plain, None, settings()).expect("no token: plain http allowed");
    }
    for local in ["http://localhost:8080/", "http://127.0.0.2/", "http://[::1]:9000/"] {
        CloudflareStreamClient::new(local, Some("tok".into()), settings()).expect(local);
    }
    for bad in ["ftp://x/", "not a url", "http://"] {
        assert_eq!(CloudflareStreamClient::new(bad, None, settings()).expect_err(bad).kind(), &ErrorKind::InvalidInput);
    }
    let e = CloudflareStreamClient::new("https://x.pipelines.cloudflare.com/", Some("tok\nsecret".into()), settings())
        .expect_err("a token no header can carry");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(!e.to_string().contains("secret"), "the token is not shown: {e}");
    let e = CloudflareStreamClient::new("https://user:secret@x.pipelines.cloudflare.com/", None, settings())
        .expect_err("credentials in the URL");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    assert!(!e.to_string().contains("secret"), "{e}");
    // A key in the query (or fragment) would be shown in every error: refused too.
    for keyed in [
        "https://x.pipelines.cloudflare.com/?token=secret",
        "https://x.pipelines.cloudflare.com/#secret",
        // Refused for another reason first (a scheme, a port): still not shown.
        "ftp://x/?token=secret",
        "https://x:99999/?token=secret",
    ] {
        let e = CloudflareStreamClient::new(keyed, None, settings()).expect_err(keyed);
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
    }
    // Refused for another reason first (a scheme, a port, a missing host): still not shown.
    for bad in [
        "ftp://user:secret@x/",
        "https://user:secret@x:99999/",
        "https://user:secret@/",
        "http://user:secret@",
        // A password holding '/' or '?': the parser ends the user info earlier than a naive cut.
        "https://user:ab/secret@host/",
        "https://user:a?secret@host/",
        r"https:\\user:secret@h:99999",
    ] {
        let e = CloudflareStreamClient::new(bad, None, settings()).expect_err(bad);
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}

/// The answers the endpoint gives besides success: 429 is retried; 501 / 505 (nothing a retry
/// changes) and 400 (a body the endpoint cannot take) fail at once, not retryable or
/// `InvalidInput`; an error page's body shows in the error only as its first 200 characters.
#[tokio::test]
async fn answers_that_no_retry_changes_are_not_retried() {
    let server = Arc::new(Server { max_body: 64 * 1024, ..Default::default() });
    let url = serve(server.clone(), "t").await;
    let client = CloudflareStreamClient::new(&url, Some("t".into()), settings()).expect("client");
    server.status_next.lock().push("429 Too Many Requests");
    let r = client.send(&events(3, 10)).await.expect("429 is retried");
    assert_eq!((r.events, r.retries), (3, 1));
    for (status, kind, retryable) in [
        ("501 Not Implemented", ErrorKind::Backend, false),
        ("505 HTTP Version Not Supported", ErrorKind::Backend, false),
        ("400 Bad Request", ErrorKind::InvalidInput, false),
    ] {
        let before = server.requests.load(Ordering::SeqCst);
        server.status_next.lock().push(status);
        let e = client.send(&events(3, 10)).await.expect_err(status);
        assert_eq!((e.kind(), e.is_retryable()), (&kind, retryable), "{status}: {e}");
        assert_eq!(server.requests.load(Ordering::SeqCst), before + 1, "{status} is not retried");
    }
    assert_eq!(server.records.lock().len(), 3);
}

/// An event that only outgrows the request limit once JSON-escaped, after many small ones: the
/// whole send is refused before the first request, so a corrected resend duplicates nothing.
#[tokio::test]
async fn an_event_too_large_once_encoded_is_refused_before_anything_is_sent() {
    let server = Arc::new(Server { max_body: 64 * 1024, ..Default::default() });
    let url = serve(server.clone(), "t").await;
    let s = CloudflareSettings { max_request_bytes: 2048, ..settings() };
    let client = CloudflareStreamClient::new(&url, Some("t".into()), s).expect("client");
    let mut batch = events(30, 10);
    // 1000 bytes of U+0001 pass `validate` but encode as 6000 bytes of `\u0001`.
    batch.push(Event::new(
        ObjectId::new("o").expect("valid"),
        "T",
        "escaped",
        vec![1u8; 1000],
        dotdo_core::Timestamp::EPOCH,
    ));
    let e = client.send(&batch).await.expect_err("too large once encoded");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    assert!(e.to_string().contains("nothing was sent"), "{e}");
    assert!(server.records.lock().is_empty(), "no request was made");
}

/// A request body of exactly `max_request_bytes` goes as one request (the limit is the body's
/// largest size): one event alone, and two that fill it together (each was one byte short: the
/// single event refused, the pair split).
#[tokio::test]
async fn a_body_of_exactly_the_limit_is_one_request() {
    let server = Arc::new(Server { max_body: 64 * 1024, ..Default::default() });
    let url = serve(server.clone(), "t").await;
    let s = CloudflareSettings { max_request_bytes: 1024, ..settings() };
    let client = CloudflareStreamClient::new(&url, Some("t".into()), s).expect("client");
    // Events whose request bodies are exactly 1024 bytes (the padding found by encoding).
    let padded = |n: usize| -> Vec<Event> {
        let base = encode(&events(n, 0)).expect("encode").len();
        let mut batch = events(n, 0);
        let pad = 1024 - base;
        let last = batch.pop().expect("one");
        batch.push(Event::new(
            last.object.clone(),
            "User",
            last.key.clone(),
            format!("{{\"pad\":\"{}\"}}", "x".repeat(pad)),
            last.timestamp,
        ));
        assert_eq!(encode(&batch).expect("encode").len(), 1024);
        batch
    };
    let before = server.requests.load(Ordering::SeqCst);
    let r = client.send(&padded(1)).await.expect("one event of exactly the limit");
    assert_eq!((r.events, r.requests), (1, 1));
    let r = client.send(&padded(2)).await.expect("two events of exactly the limit");
    assert_eq!((r.events, r.requests), (2, 1));
    assert_eq!(server.requests.load(Ordering::SeqCst), before + 2);
    // One byte more: the pair is split, the single event refused.
    let s = CloudflareSettings { max_request_bytes: 1024, ..settings() };
    let one_more = |mut batch: Vec<Event>| {
        let last = batch.pop().expect("one");
        let mut value = last.value.to_vec();
        value.push(b' ');
        batch.push(Event::new(last.object.clone(), "User", last.key.clone(), value, last.timestamp));
        batch
    };
    let client = CloudflareStreamClient::new(&url, Some("t".into()), s).expect("client");
    assert_eq!(client.send(&one_more(padded(2))).await.expect("split").requests, 2);
    let e = client.send(&one_more(padded(1))).await.expect_err("over the limit alone");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
}

/// A redirect is an error, never a success: followed, it would turn the POST into a body-less
/// GET whose 200 read as every event accepted.
#[tokio::test]
async fn a_redirect_is_an_error_not_a_silent_success() {
    let server = Arc::new(Server { max_body: 64 * 1024, ..Default::default() });
    let url = serve(server.clone(), "t").await;
    server.redirect_next.store(1, Ordering::SeqCst);
    let client = CloudflareStreamClient::new(&url, Some("t".into()), settings()).expect("client");
    let e = client.send(&events(3, 10)).await.expect_err("redirected");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(server.records.lock().is_empty());
    assert_eq!(client.send(&events(3, 10)).await.expect("direct").events, 3);
}

#[tokio::test]
async fn a_value_that_is_not_utf8_is_refused_and_nothing_is_sent() {
    let server = Arc::new(Server { max_body: 64 * 1024, ..Default::default() });
    let url = serve(server.clone(), "t").await;
    let client = CloudflareStreamClient::new(&url, Some("t".into()), settings()).expect("client");
    let mut batch = events(10, 10);
    batch.push(Event::new(
        ObjectId::new("do-x").expect("valid"),
        "User",
        "binary",
        vec![0x7bu8, 0xff, 0xfe, 0x7d],
        Timestamp::from_millis(1_700_000_000_000),
    ));
    let e = client.send(&batch).await.expect_err("binary value");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("binary"), "names the key: {e}");
    assert!(server.records.lock().is_empty(), "no event of the call was sent");
    assert_eq!(encode(&batch).expect_err("encode").kind(), &ErrorKind::InvalidInput);
    assert!(encode(&batch[..10]).is_ok());
}

/// A request the endpoint refuses as too large (its limit is below the configured one) is split
/// and sent again in order; when a send fails part-way, the error carries how many events were
/// accepted (always the first ones), so a resend of the rest duplicates nothing.
#[tokio::test]
async fn too_large_requests_are_split_and_a_failed_send_says_how_far_it_got() {
    let server = Arc::new(Server { max_body: 2048, ..Default::default() });
    let url = serve(server.clone(), "t").await;
    let s = CloudflareSettings { max_request_bytes: 8192, ..settings() };
    let client = CloudflareStreamClient::new(&url, Some("t".into()), s).expect("client");
    let r = client.send(&events(12, 200)).await.expect("split until the endpoint takes them");
    assert_eq!(r.events, 12);
    let keys = |srv: &Server| {
        srv.records.lock().iter().map(|v| v["key"].as_str().expect("key").to_string()).collect::<Vec<_>>()
    };
    assert_eq!(keys(&server), (0..12).map(|i| format!("k{i}")).collect::<Vec<_>>(), "in order, each once");
    // Three small events, then one the endpoint never takes.
    server.records.lock().clear();
    let mut evs = events(3, 200);
    evs.extend(events(4, 3000).into_iter().skip(3));
    let e = client.send(&evs).await.expect_err("the last event is too large for the endpoint");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    let partial = PartialSend::of(&e).expect("how far it got");
    assert_eq!(partial.report.events, 3, "{partial:?}");
    assert_eq!(keys(&server), ["k0", "k1", "k2"], "the accepted events are the first ones");
    // Nothing accepted: no partial progress attached.
    let e = client.send(&events(4, 3000)[3..]).await.expect_err("too large");
    assert!(PartialSend::of(&e).is_none(), "{e}");
    // A timeout no silent endpoint should be allowed to hold a send for.
    let long = CloudflareSettings { timeout: Duration::MAX, ..settings() };
    let e = CloudflareStreamClient::new(&url, None, long).expect_err("no timeout to speak of");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    let most = CloudflareSettings { timeout: dotdo_pipelines::cloudflare::MAX_STREAM_TIMEOUT, ..settings() };
    CloudflareStreamClient::new(&url, None, most).expect("the longest timeout");
    let zero = CloudflareSettings { timeout: Duration::ZERO, ..settings() };
    assert_eq!(
        CloudflareStreamClient::new(&url, None, zero).expect_err("zero timeout").kind(),
        &ErrorKind::InvalidInput
    );
    // Settings that would hold a send for hours (or for ever) on a failing endpoint.
    for (what, bad) in [
        (
            "max_retries",
            CloudflareSettings { max_retries: dotdo_pipelines::cloudflare::MAX_STREAM_RETRIES + 1, ..settings() },
        ),
        ("max_retries", CloudflareSettings { max_retries: u32::MAX, ..settings() }),
        ("backoff", CloudflareSettings { backoff: Duration::MAX, ..settings() }),
        ("backoff", CloudflareSettings { backoff: Duration::from_secs(6), ..settings() }),
        // Retries back to back at a failing endpoint.
        ("backoff", CloudflareSettings { backoff: Duration::ZERO, ..settings() }),
    ] {
        let e = CloudflareStreamClient::new(&url, None, bad).expect_err(what);
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains(what), "{e}");
    }
    let most = CloudflareSettings {
        max_retries: dotdo_pipelines::cloudflare::MAX_STREAM_RETRIES,
        backoff: Duration::from_secs(5),
        ..settings()
    };
    CloudflareStreamClient::new(&url, None, most).expect("within bounds");
    let no_retries = CloudflareSettings { max_retries: 0, backoff: Duration::ZERO, ..settings() };
    CloudflareStreamClient::new(&url, None, no_retries).expect("no retries, no backoff");
}

/// Polled outside a tokio runtime (another executor), a send is `InvalidInput` and sends
/// nothing, instead of a panic in the caller's task (reqwest's timers need tokio's).
#[test]
fn a_send_outside_a_tokio_runtime_is_refused() {
    let client =
        CloudflareStreamClient::new("http://127.0.0.1:9", None, CloudflareSettings::default()).expect("client");
    let e = futures::executor::block_on(client.send(&events(1, 10))).expect_err("no runtime");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("tokio runtime"), "{e}");
}
