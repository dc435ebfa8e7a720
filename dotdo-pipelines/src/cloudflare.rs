//! A client for Cloudflare Pipelines streams: HTTP JSON batches with an auth token, retries with
//! backoff, and the per-request size limit (feature `cloudflare`, on by default).
//!
//! Delivery is **at least once**: the endpoint has no idempotency key and the records carry no
//! id it could deduplicate by, so a request whose reply was lost (a timeout, a dropped
//! connection, a gateway error after the stream took it) and that is sent again delivers its
//! events twice. A send whose retries run out after such an attempt fails with
//! `AmbiguousOutcome` (its events may be there); `Unavailable` means none of the failed
//! request's attempts can have been taken. Readers that need each event once deduplicate on an
//! id the application puts into the value: `(do_id, key, timestamp)` is not unique (the
//! timestamp is sent in milliseconds, and two events of one key may share one).
//!
//! Wire protocol (Cloudflare's stream HTTP endpoint): `POST <endpoint>` with a JSON array of
//! objects as the body, `Content-Type: application/json`, and, when the stream requires it,
//! `Authorization: Bearer <API token>`. A 2xx answer means the records were accepted (taken in:
//! a stream with a schema checks records afterwards, and drops those that do not fit it); 408,
//! 429 and 5xx (but 501 and 505, which no retry changes) are transient (retried after the
//! backoff, or after the answer's `Retry-After` seconds if longer, up to [`MAX_RETRY_AFTER`]).
//! Of those, a 5xx other than 503 (not handled) and Cloudflare's 521, 523, 525 and 526 (the edge
//! never reached the origin) may come after the records were taken, and leaves the events'
//! fate unknown. A TLS client refusing the endpoint (its certificate, or an answer that is no
//! TLS) is `InvalidInput`, not retried. 401/403 mean a bad token; 404 (`NotFound`) no stream at the endpoint; 413 a
//! request too large. A 2xx whose JSON body says
//! `"success": false` is a refusal, and one whose `result.committed` is not the count sent an
//! `AmbiguousOutcome` (a body of no such shape, or none, reads as accepted). Each event is sent in the
//! predecessor's shape: `{"do_id", "type", "key", "value", "timestamp"}` with `value` as the
//! event's text (JSON) and `timestamp` in milliseconds.

use std::sync::Arc;
use std::time::Duration;

use dotdo_core::{Clock, Error, ErrorKind, Result, SystemClock};

use crate::event::Event;

/// The most retries per request [`CloudflareSettings::max_retries`] accepts (100): a send to an
/// endpoint that keeps failing must end in bounded time.
pub const MAX_STREAM_RETRIES: u32 = 100;

/// The longest request timeout [`CloudflareSettings::timeout`] accepts (5 minutes): an endpoint
/// that takes a connection and never answers must not hold a send for ever.
pub const MAX_STREAM_TIMEOUT: Duration = Duration::from_secs(300);

/// The longest backoff between retries (5 s), and so the largest first backoff
/// [`CloudflareSettings::backoff`] accepts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Settings of a [`CloudflareStreamClient`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudflareSettings {
    /// Largest request body in bytes (default 1 MB, the per-request limit Cloudflare documents
    /// for Pipelines streams; raise it where the endpoint takes more); larger sends are split
    /// into several requests.
    pub max_request_bytes: usize,
    /// Retries of a transient failure (408, 429, 5xx but 501 and 505, connection errors) per
    /// request (default 5; at most [`MAX_STREAM_RETRIES`]).
    pub max_retries: u32,
    /// First backoff, doubled per retry up to 5 s (default 100 ms; at most 5 s, above zero
    /// unless `max_retries` is 0; each wait a
    /// random length between half of that and all of it). An answer's `Retry-After`
    /// stretches one wait (up to [`MAX_RETRY_AFTER`]; a longer one fails the send, retryable).
    pub backoff: Duration,
    /// Timeout of one request (default 30 s; at most [`MAX_STREAM_TIMEOUT`]). A connection not
    /// made within the shorter of half of this and 10 s fails that attempt (retried: nothing
    /// was sent).
    pub timeout: Duration,
}

impl Default for CloudflareSettings {
    fn default() -> Self {
        CloudflareSettings {
            max_request_bytes: 1_000_000,
            max_retries: 5,
            backoff: Duration::from_millis(100),
            timeout: Duration::from_secs(30),
        }
    }
}

/// What a [`CloudflareStreamClient::send`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamSendReport {
    /// HTTP requests that succeeded.
    pub requests: u64,
    /// Events accepted.
    pub events: u64,
    /// Retries after transient failures.
    pub retries: u64,
}

/// How far a [`CloudflareStreamClient::send`] got before it failed: the `source()` of its error
/// whenever at least one request was accepted ([`PartialSend::of`] finds it). The accepted
/// events are always the first `report.events` of the slice sent, so a caller resends
/// `&events[report.events as usize..]` and duplicates none of the accepted ones. (When the error
/// is `AmbiguousOutcome`, the request that failed may have been accepted all the same, its reply
/// lost to a timeout or a gateway error: its events may then arrive twice; delivery is at least
/// once.) Its own source is the failure.
#[derive(Debug)]
pub struct PartialSend {
    /// What was done before the failure.
    pub report: StreamSendReport,
    cause: Error,
}

impl std::fmt::Display for PartialSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of the events were accepted before the send failed", self.report.events)
    }
}

impl std::error::Error for PartialSend {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.cause)
    }
}

impl PartialSend {
    /// The partial progress recorded in `e`, if `e` came from a send that got some events
    /// accepted.
    pub fn of(e: &Error) -> Option<&PartialSend> {
        std::error::Error::source(e).and_then(|s| s.downcast_ref::<PartialSend>())
    }

    /// `e` with `report` attached as its source, if anything was accepted.
    fn attach(e: Error, report: StreamSendReport) -> Error {
        if report.requests == 0 {
            return e;
        }
        let outer = Error::new(e.kind().clone(), e.message().to_string()).with_retryable(e.is_retryable());
        outer.with_source(PartialSend { report, cause: e })
    }
}

/// Sends events to a Cloudflare Pipelines stream over HTTP.
#[derive(Clone)]
pub struct CloudflareStreamClient {
    endpoint: reqwest::Url,
    token: Option<String>,
    http: reqwest::Client,
    settings: CloudflareSettings,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for CloudflareStreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudflareStreamClient")
            .field("endpoint", &self.endpoint.as_str())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("settings", &self.settings)
            .finish()
    }
}

/// Encode events as the stream's JSON array. A value that is not UTF-8 text is `InvalidInput`
/// (the stream's `value` field is a JSON string; bytes would be altered on the way).
pub fn encode(events: &[Event]) -> Result<Vec<u8>> {
    let items = events.iter().map(event_json).collect::<Result<Vec<serde_json::Value>>>()?;
    serde_json::to_vec(&items).map_err(|e| Error::invalid("encoding events as JSON").with_source(e))
}

fn event_json(e: &Event) -> Result<serde_json::Value> {
    let value = std::str::from_utf8(&e.value).map_err(|err| {
        Error::invalid(format!(
            "the value of {} key {:?} is not UTF-8 text (byte {}), which a Cloudflare Pipelines stream cannot carry unaltered",
            e.object,
            e.key,
            err.valid_up_to()
        ))
    })?;
    Ok(serde_json::json!({
        "do_id": e.object.as_str(),
        "type": e.type_name,
        "key": e.key,
        "value": value,
        "timestamp": e.timestamp.as_millis(),
    }))
}

impl CloudflareStreamClient {
    /// A client for the stream at `endpoint` (a stream's `https://<stream-id>.ingest.cloudflare.com`,
    /// a legacy pipeline's `https://<id>.pipelines.cloudflare.com/`, or `http://` for a local
    /// endpoint), with an optional API token.
    pub fn new(endpoint: &str, token: Option<String>, settings: CloudflareSettings) -> Result<Self> {
        // Credentials in the URL are refused below; until then no message may show them.
        let shown = shown_endpoint(endpoint);
        let url =
            reqwest::Url::parse(endpoint).map_err(|e| Error::invalid(format!("stream endpoint {shown:?}: {e}")))?;
        if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
            return Err(Error::invalid(format!("stream endpoint {shown:?} must be an http(s) URL with a host")));
        }
        if !url.username().is_empty() || url.password().is_some() {
            // Credentials in the URL would show up in every error message and Debug output.
            return Err(Error::invalid("the stream endpoint must not carry credentials; pass the API token instead"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            // A key in the query would show up in every error message and Debug output too; the
            // stream endpoints take none.
            return Err(Error::invalid(
                "the stream endpoint must not carry a query or fragment (the stream endpoints take none; a key \
                 belongs in the API token)",
            ));
        }
        if token.as_deref().is_some_and(|t| t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control())) {
            return Err(Error::invalid("the API token must be non-empty without whitespace"));
        }
        if settings.max_request_bytes < 1024 {
            return Err(Error::invalid("max_request_bytes must be at least 1024"));
        }
        if settings.timeout.is_zero() {
            return Err(Error::invalid("the request timeout must be above zero (every request would time out)"));
        }
        if settings.timeout > MAX_STREAM_TIMEOUT {
            return Err(Error::invalid(format!(
                "the request timeout {:?} is above {MAX_STREAM_TIMEOUT:?}: a silent endpoint would hold a send that long per attempt",
                settings.timeout
            )));
        }
        // A token would cross the network in clear text: only to this machine.
        let loopback = is_loopback(&url);
        if token.is_some() && url.scheme() == "http" && !loopback {
            return Err(Error::invalid(format!(
                "stream endpoint {shown:?}: an API token is sent only over https (or http to this machine's loopback)"
            )));
        }
        if settings.max_retries > MAX_STREAM_RETRIES {
            return Err(Error::invalid(format!(
                "max_retries {} is above {MAX_STREAM_RETRIES}: a send to a failing endpoint would retry for hours",
                settings.max_retries
            )));
        }
        if settings.backoff.is_zero() && settings.max_retries > 0 {
            return Err(Error::invalid(
                "backoff must be above zero when retries are on (doubling zero stays zero: every retry would \
                 follow the failure at once, at an endpoint that is already failing)",
            ));
        }
        if settings.backoff > MAX_BACKOFF {
            return Err(Error::invalid(format!(
                "backoff {:?} is above {MAX_BACKOFF:?}, the longest wait between retries",
                settings.backoff
            )));
        }
        let mut http = reqwest::Client::builder();
        if loopback {
            // A token allowed over plain http to this machine must not go to a proxy that the
            // environment (HTTP_PROXY, ALL_PROXY) names instead.
            http = http.no_proxy();
        }
        let http = http
            .timeout(settings.timeout)
            // Shorter than the request's own timeout, which otherwise fires first and makes a
            // connection that never came up read as a request sent and unanswered.
            .connect_timeout((settings.timeout / 2).min(CONNECT_TIMEOUT))
            // A redirect would turn the POST into a body-less GET (and drop the token across
            // hosts), whose 2xx would then read as events accepted.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::backend("building the HTTP client").with_source(e))?;
        Ok(CloudflareStreamClient { endpoint: url, token, http, settings, clock: Arc::new(SystemClock::new()) })
    }

    /// Read time (for backoff sleeps) from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Send `events`, split into requests of at most `max_request_bytes`, each retried on
    /// transient failures. Delivery is at least once per request (the HTTP endpoint has no
    /// idempotency key); a failure after some requests succeeded carries how far it got as a
    /// [`PartialSend`] (the accepted events are a prefix of `events`). A request the endpoint
    /// refuses as too large (413) is split in two and sent again. One event larger than the limit
    /// once encoded (JSON escaping can grow a value up to six times) is `LimitExceeded`; an
    /// invalid event (or a value that is not UTF-8) is `InvalidInput`. Every event is checked before the first request: on either error
    /// nothing is sent. Runs inside a tokio runtime with its I/O and time drivers enabled (the
    /// HTTP client's sockets and timers need them: `enable_all()` on the builder, as
    /// `#[tokio::main]` does); polled on another executor it is `InvalidInput`, and nothing is
    /// sent. On a tokio runtime built without those drivers the HTTP client panics (tokio offers
    /// no way to tell beforehand).
    pub async fn send(&self, events: &[Event]) -> Result<StreamSendReport> {
        if tokio::runtime::Handle::try_current().is_err() {
            // reqwest would panic ("there is no reactor running") in the caller's task.
            return Err(Error::invalid(
                "CloudflareStreamClient::send must run inside a tokio runtime (its HTTP client needs one)",
            ));
        }
        let mut report = StreamSendReport::default();
        let mut items = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            e.validate().map_err(|err| {
                err.context(format!("event {i} of {} ({}); nothing was sent", events.len(), e.label()))
            })?;
            let v = event_json(e)?;
            // The event and the `,` or `]` after it.
            let len = serde_json::to_vec(&v).map(|b| b.len()).unwrap_or(0) + 1;
            // A request of this event alone: `[` + the event + `]`.
            if len + 1 > self.settings.max_request_bytes {
                return Err(Error::limit("stream event", self.settings.max_request_bytes as u64, len as u64 + 1)
                    .context(format!(
                        "event {i} of {} (key {:?}) once encoded as a request; nothing was sent",
                        events.len(),
                        e.key
                    )));
            }
            items.push((v, len));
        }
        let mut chunks = std::collections::VecDeque::new();
        let mut chunk: Vec<serde_json::Value> = Vec::new();
        // The request body so far: `[`, then each event with its `,` (the last one's is `]`).
        let mut size = 1usize;
        for (v, len) in items {
            if !chunk.is_empty() && size + len > self.settings.max_request_bytes {
                chunks.push_back((std::mem::take(&mut chunk), false));
                size = 1;
            }
            size += len;
            chunk.push(v);
        }
        if !chunk.is_empty() {
            chunks.push_back((chunk, false));
        }
        // In order, so that what is accepted is always a prefix of `events`. Each chunk carries
        // whether an attempt of a request that held it may have been taken (a request split
        // after such an attempt: its halves' events may be there already).
        while let Some((mut items, uncertain)) = chunks.pop_front() {
            let mut taken = uncertain;
            match self.post(&items, &mut report, &mut taken).await {
                Ok(()) => {}
                // The endpoint's limit is below the configured one: halves, in order.
                Err(e) if matches!(e.kind(), ErrorKind::LimitExceeded { .. }) && items.len() > 1 => {
                    let second = items.split_off(items.len() / 2);
                    chunks.push_front((second, taken));
                    chunks.push_front((items, taken));
                }
                // A single event too large, whose request may have been taken by an attempt before
                // the endpoint refused its size: delivered or not, unknown.
                Err(e) if taken && matches!(e.kind(), ErrorKind::LimitExceeded { .. }) => {
                    let n = items.len();
                    let unknown = Error::new(
                        ErrorKind::AmbiguousOutcome,
                        format!(
                            "a request of {n} event(s) the stream endpoint refused as too large may have been \
                             accepted by an earlier attempt (it had no answer, or a gateway error)"
                        ),
                    )
                    .with_source(e);
                    return Err(PartialSend::attach(unknown, report));
                }
                Err(e) => return Err(PartialSend::attach(e, report)),
            }
        }
        Ok(report)
    }

    /// Post one request of `items`, retried; `uncertain` says (and is set when) an attempt may
    /// have been taken although no 2xx came back.
    async fn post(
        &self,
        items: &[serde_json::Value],
        report: &mut StreamSendReport,
        uncertain: &mut bool,
    ) -> Result<()> {
        let n = items.len() as u64;
        let body = serde_json::to_vec(items).map_err(|e| Error::invalid("encoding events as JSON").with_source(e))?;
        let mut backoff = self.settings.backoff;
        let mut attempt = 0;
        loop {
            let mut req =
                self.http.post(self.endpoint.clone()).header("content-type", "application/json").body(body.clone());
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            let mut retry_after = None;
            let outcome = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() {
                        // A 2xx whose JSON says otherwise (`{"success": false}`, or fewer records
                        // committed than sent) is not taken as every event accepted; it fails
                        // the request (ambiguous after an attempt that may have been taken).
                        let text = error_body_start(resp).await;
                        let Some(refusal) = refused_despite_2xx(&text, n) else {
                            report.requests += 1;
                            report.events += n;
                            return Ok(());
                        };
                        // Not retryable: it fails the request below.
                        refusal
                    } else {
                        retry_after = retry_after_of(resp.headers());
                        let text = error_body_start(resp).await;
                        let msg = format!(
                            "stream endpoint answered {status}: {}",
                            text.chars().take(200).collect::<String>()
                        );
                        match status.as_u16() {
                            // Not implemented / HTTP version not supported: no retry can succeed.
                            501 | 505 => Error::backend(msg).with_retryable(false),
                            // The server says it did not handle the request (503), or
                            // Cloudflare's edge never reached the origin (521 down, 523
                            // unreachable, 525/526 TLS): nothing was taken.
                            408 | 429 | 503 | 521 | 523 | 525 | 526 => Error::unavailable(msg),
                            // Any other server or gateway error (500, 502, 504, Cloudflare's 520
                            // "unknown", 522 "timed out", which Cloudflare also answers when the
                            // origin did not acknowledge a request it was sent, and 524 "the
                            // origin took it and timed out", ...) may come after the stream took
                            // the records: retried, but the events may be there.
                            500..=599 => {
                                *uncertain = true;
                                Error::unavailable(msg)
                            }
                            // No such stream (deleted, or a mistyped endpoint).
                            404 => Error::new(ErrorKind::NotFound, format!("{msg} (no stream at this endpoint)")),
                            300..=399 => Error::invalid(format!("{msg} (a redirect: configure the final endpoint)")),
                            401 | 403 => Error::backend(format!("{msg} (check the API token)")).with_retryable(false),
                            // The endpoint takes less than this request (which is within the
                            // configured `max_request_bytes`).
                            413 => Error::new(
                                ErrorKind::LimitExceeded {
                                    what: "stream request (the endpoint's own limit; 0: not stated)",
                                    limit: 0,
                                    actual: body.len() as u64,
                                },
                                format!(
                                    "{msg} (the endpoint refused a {}-byte request; its limit is not stated)",
                                    body.len()
                                ),
                            ),
                            _ => Error::invalid(msg),
                        }
                    }
                }
                // No connection (refused, DNS, TLS handshake): nothing was sent. A TLS client
                // refusing the endpoint (a certificate it does not accept: a private CA, an
                // intercepting proxy, another name; or an answer that is no TLS, an `https://`
                // URL for a plain-HTTP server) is configuration: no retry changes it (it was a
                // retryable `Unavailable`, retried up to `max_retries` on every send).
                Err(e) if e.is_connect() => {
                    if tls_refused(&e) {
                        Error::invalid(format!(
                            "stream endpoint {}: the TLS client refused the server (its certificate, or an \
                             answer that is no TLS)",
                            self.endpoint
                        ))
                        .with_source(e)
                    } else {
                        Error::unavailable(format!("stream endpoint {} unreachable", self.endpoint)).with_source(e)
                    }
                }
                // Sent, or partly sent, and no answer (a timeout, a connection closed before
                // the reply): the stream may have taken the records.
                Err(e) => {
                    *uncertain = true;
                    Error::unavailable(format!("stream endpoint {} did not answer", self.endpoint)).with_source(e)
                }
            };
            let done = |outcome: Error| done_with(outcome, *uncertain, n, report.requests, attempt);
            if !outcome.is_retryable() || attempt >= self.settings.max_retries {
                return Err(done(outcome));
            }
            // An endpoint that says when to come back (`Retry-After` on a 429 or 503) is not
            // asked again sooner; one that asks for longer than a call should wait fails the
            // call (retryable), leaving the wait to the caller.
            let wait = match retry_after {
                Some(after) if after > MAX_RETRY_AFTER => {
                    return Err(done(outcome.context(format!(
                        "the endpoint asks to retry after {after:?} (more than {MAX_RETRY_AFTER:?})"
                    ))));
                }
                Some(after) => dotdo_core::retry::jittered(backoff).max(after),
                None => dotdo_core::retry::jittered(backoff),
            };
            attempt += 1;
            report.retries += 1;
            self.clock.sleep(wait).await;
            backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
        }
    }
}

/// The longest wait for a connection to the endpoint (10 s, or half the request timeout if
/// shorter).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the TLS client refused the server while connecting (rustls: a certificate it does not
/// accept; or an answer that is no TLS at all, "received corrupt message"), by the error's whole
/// source chain.
fn tls_refused(e: &reqwest::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if text.contains("invalid peer certificate") || text.contains("received corrupt message") {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Whether `url`'s host is this machine: `localhost` or a loopback address.
fn is_loopback(url: &reqwest::Url) -> bool {
    use url::Host;
    match url.host() {
        Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(Host::Ipv4(a)) => a.is_loopback(),
        Some(Host::Ipv6(a)) => a.is_loopback(),
        None => false,
    }
}

/// The failure `outcome` of a request of `n` events after `attempt` retries (`accepted`
/// requests before it): `AmbiguousOutcome` if an attempt may have been taken (`uncertain`), but
/// for a request too large (`LimitExceeded`: split and its halves sent on, carrying the flag; a
/// single event too large after such an attempt is made `AmbiguousOutcome` by `send`);
/// retryable as the last answer is.
fn done_with(outcome: Error, uncertain: bool, n: u64, accepted: u64, attempt: u32) -> Error {
    let outcome = outcome.context(format!("after {accepted} accepted request(s) and {attempt} retries"));
    let too_large = matches!(outcome.kind(), ErrorKind::LimitExceeded { .. });
    if uncertain && !too_large && outcome.kind() != &ErrorKind::AmbiguousOutcome {
        let retryable = outcome.is_retryable();
        Error::new(
            ErrorKind::AmbiguousOutcome,
            format!(
                "a request of {n} events to the stream endpoint may have been accepted (an attempt had no answer \
                 or a gateway error); they may be delivered already"
            ),
        )
        .with_retryable(retryable)
        .with_source(outcome)
    } else {
        outcome
    }
}

/// The error of a 2xx answer whose JSON body (`text`, the legacy endpoint's
/// `{"success": …, "result": {"committed": N}}`) says the `n` events were not all taken:
/// `success: false` is a refusal (nothing taken; the answer's errors shown), a `committed` count
/// other than `n` an `AmbiguousOutcome` (some may be there). Any other body (none, or another
/// shape) reads as accepted; a body cut short by the 4 KiB read (or broken off) that does not
/// parse is still a refusal if it says `"success": false`.
fn refused_despite_2xx(text: &str, n: u64) -> Option<Error> {
    let shown = || text.chars().take(200).collect::<String>();
    let refusal = || {
        Error::backend(format!("stream endpoint answered 2xx with success: false: {}", shown())).with_retryable(false)
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return says_success_false(text).then(refusal);
    };
    if v.get("success").and_then(serde_json::Value::as_bool) == Some(false) {
        return Some(refusal());
    }
    let committed = v.get("result").and_then(|r| r.get("committed")).and_then(serde_json::Value::as_u64)?;
    (committed != n).then(|| {
        Error::new(
            ErrorKind::AmbiguousOutcome,
            format!("stream endpoint committed {committed} of {n} events sent in one request: {}", shown()),
        )
    })
}

/// Whether `text` (the start of a JSON object) sets `"success"` to `false` as its first key
/// named so (taken for the top-level one: the legacy endpoint's answers are small, and a refusal's
/// error entries carry no `"success"`; a nested one after it, in an accepted answer's details, is
/// not it).
fn says_success_false(text: &str) -> bool {
    text.trim_start().starts_with('{')
        && text.match_indices("\"success\"").next().is_some_and(|(i, key)| {
            let rest = text[i + key.len()..].trim_start();
            rest.strip_prefix(':').is_some_and(|v| {
                let v = v.trim_start();
                v.starts_with("false") && !v[5..].starts_with(|c: char| c.is_ascii_alphanumeric())
            })
        })
}

/// The start of an error answer's body (at most 4 KiB are read: a proxy's error page can be
/// large, and only its first 200 characters go into the error).
async fn error_body_start(mut resp: reqwest::Response) -> String {
    const MAX: usize = 4096;
    let mut buf = Vec::new();
    while buf.len() < MAX {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c[..c.len().min(MAX - buf.len())]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// `endpoint` as an error message may show it: not at all if it holds an `@` anywhere (where a
/// URL ends its user info depends on the parser, and a password may hold `/`, `?` or `#`), nor a
/// query or fragment (a key there), whatever refuses it first.
fn shown_endpoint(endpoint: &str) -> String {
    if endpoint.contains('@') {
        return "<an endpoint with '@', not shown: it may hold credentials>".to_string();
    }
    if endpoint.contains(['?', '#']) {
        return "<an endpoint with a query or fragment, not shown: it may hold a key>".to_string();
    }
    endpoint.to_string()
}

/// The longest `Retry-After` a send waits out itself.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// A `Retry-After` header in seconds (the HTTP-date form is not used by the stream endpoint and
/// is ignored: the backoff applies).
fn retry_after_of(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    match v.parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        // More seconds than a u64 holds: far longer than `MAX_RETRY_AFTER`, as such (it was
        // ignored, and the endpoint asked again within the plain backoff).
        Err(_) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => Some(Duration::MAX),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    /// A body cut short is a refusal only if its top-level `"success"` (the first key named so)
    /// is `false`: a nested one further on in an accepted answer, or a longer word, is not.
    /// `Retry-After` in seconds, also more than a u64 holds (as long as can be); the HTTP-date
    /// form and anything else is ignored.
    #[test]
    fn retry_after_is_read_in_seconds() {
        let of = |v: &str| {
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(reqwest::header::RETRY_AFTER, v.parse().expect("header value"));
            super::retry_after_of(&h)
        };
        assert_eq!(of("7"), Some(std::time::Duration::from_secs(7)));
        assert_eq!(of(" 12 "), Some(std::time::Duration::from_secs(12)));
        assert_eq!(of("18446744073709551616"), Some(std::time::Duration::MAX));
        assert_eq!(of("Wed, 21 Oct 2026 07:28:00 GMT"), None);
        assert_eq!(of("-3"), None);
    }

    #[test]
    fn success_false_is_read_from_the_first_key_only() {
        use super::says_success_false as says;
        assert!(says(r#"{"success": false, "errors": [{"message": "xxxx"#));
        assert!(says(r#" {"success":false"#));
        assert!(!says(r#"{"success":true,"result":{"details":[{"success":false}]"#));
        assert!(!says(r#"{"success": falsey"#));
        assert!(!says(r#"<html>"success": false"#));
        assert!(!says(r#"{"message":"the \"success\": false case"#));
    }
}
