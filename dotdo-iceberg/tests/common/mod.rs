//! Helpers shared by the integration tests: records, the Python interpreter of the interop
//! tests, a local S3 server (moto), and a fault-injecting object store.
#![allow(dead_code)]

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dotdo_core::{ChangeRecord, Clock, ColdBatch, FencingToken, ObjectChanges, ObjectId, Op, SystemClock, Timestamp};
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions,
    PutPayload, PutResult, UploadPart,
};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The files under `dir` (recursively) whose names end with `suffix`.
pub fn files_ending_with(dir: &std::path::Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p);
            }
        }
    }
    out
}

/// A put record for `object` at `seq`.
pub fn put(object: &ObjectId, seq: u64, key: &str, value: &str, token: u64) -> ChangeRecord {
    ChangeRecord {
        object: object.clone(),
        seq,
        key: key.to_string(),
        op: Op::Put,
        value: Bytes::copy_from_slice(value.as_bytes()),
        token: FencingToken::new(token),
        timestamp: Timestamp::from_millis(1_767_225_600_000 + seq as i64),
        type_name: "T".to_string(),
    }
}

/// Edit the table metadata JSON file at `location` (a `file://` URL) in place, as another
/// engine or damage would.
#[allow(dead_code)] // not every test binary including this module uses it
pub fn edit_metadata(location: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = location.strip_prefix("file://").expect("local");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
    edit(&mut json);
    std::fs::write(path, serde_json::to_vec(&json).expect("encode")).expect("write");
}

/// A batch of one put (`k` = `v`, token 1) at `seq` for each of `objects`.
#[allow(dead_code)] // not every test binary including this module uses it
pub fn one_put_each(objects: &[ObjectId], seq: u64) -> ColdBatch {
    one_value_each(objects, seq, "v")
}

/// A batch of one put (`k` = `value`, token 1) at `seq` for each of `objects`.
#[allow(dead_code)] // not every test binary including this module uses it
pub fn one_value_each(objects: &[ObjectId], seq: u64, value: &str) -> ColdBatch {
    ColdBatch {
        objects: objects
            .iter()
            .map(|o| ObjectChanges {
                object: o.clone(),
                token: FencingToken::new(1),
                records: vec![put(o, seq, "k", value, 1)],
            })
            .collect(),
    }
}

/// The Python of the interop tests (`DOTDO_PYTHON`, set by `scripts/test` after `scripts/pyenv`).
/// `None` after printing a visible SKIP line naming `test`; a failure instead when
/// `DOTDO_REQUIRE_PYTHON` is set (as `scripts/test`, and so CI, does).
pub fn python(test: &str) -> Option<PathBuf> {
    match std::env::var_os("DOTDO_PYTHON") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ if std::env::var_os("DOTDO_REQUIRE_PYTHON").is_some() => {
            panic!("{test}: DOTDO_PYTHON is not set but DOTDO_REQUIRE_PYTHON is: the interop test would be skipped")
        }
        _ => {
            // Written to the real stderr (not the test harness's capture) so it shows up in a
            // normal `cargo test` run.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIP {test}: DOTDO_PYTHON is not set (run scripts/pyenv and export \
                 DOTDO_PYTHON=$PWD/.venv/bin/python, or use scripts/test, which does both)"
            );
            None
        }
    }
}

/// Directory of the Python helper scripts.
pub fn py_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("py")
}

/// Start the server script `script` of `tests/py` with `python` on a free port of 127.0.0.1
/// (its first argument 0, then `args`), and wait for its `READY <port>` line: the child and the
/// port.
#[allow(dead_code)] // not every test binary including this module uses it
pub fn start_server(python: &std::path::Path, script: &str, args: &[&str]) -> (Child, u16) {
    // Port 0: the server binds a free port itself and reports it (a port found free here and
    // handed over could be taken by another test's server in between).
    let mut child = Command::new(python)
        .arg(py_dir().join(script))
        .arg("0")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start tests/py/{script}: {e}"));
    let stdout = child.stdout.take().expect("server stdout");
    // Read the ready line on a thread: a server that hangs before it would otherwise hold the
    // test (and CI) until the job's own time limit.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line);
        let _ = tx.send(r);
    });
    let line = match rx.recv_timeout(std::time::Duration::from_secs(120)) {
        Ok(Ok(line)) => line,
        other => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{script} did not report READY within 120 s: {other:?}");
        }
    };
    match line.trim().strip_prefix("READY ").map(str::parse) {
        Some(Ok(port)) => (child, port),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{script} did not start: {line:?}")
        }
    }
}

/// An Iceberg REST catalog (tests/py/rest_catalog.py: PyIceberg's SqlCatalog behind the REST
/// protocol) on 127.0.0.1 with its warehouse in a directory of its own, killed on drop (and
/// exiting by itself when this process dies, removing the directory: a server in a `static`
/// is never dropped).
#[allow(dead_code)] // not every test binary including this module uses it
pub struct RestCatalogServer {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub uri: String,
    /// The warehouse directory the catalog places tables in.
    pub warehouse: tempfile::TempDir,
}

#[allow(dead_code)] // not every test binary including this module uses it
impl RestCatalogServer {
    /// Start the catalog with `python`.
    pub fn start(python: &std::path::Path) -> RestCatalogServer {
        let warehouse = tempfile::tempdir().expect("tempdir");
        let db = warehouse.path().join("rest-catalog.db");
        let url = format!("file://{}", warehouse.path().display());
        let dir = warehouse.path().to_str().expect("utf-8");
        let (child, port) = start_server(python, "rest_catalog.py", &[db.to_str().expect("utf-8"), &url, dir]);
        RestCatalogServer { child, uri: format!("http://127.0.0.1:{port}"), warehouse }
    }

    /// A plain HTTP/1.1 request to the server's test controls: the reply's body.
    pub fn control(&self, method: &str, path: &str) -> String {
        use std::io::{Read, Write};
        let addr = self.uri.strip_prefix("http://").expect("http");
        let mut s = std::net::TcpStream::connect(addr).expect("connect to the REST catalog");
        write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .expect("send");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("reply");
        assert!(reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"), "{reply}");
        reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
    }

    /// Send the server process `signal` (`"STOP"`: it keeps its port and accepts connections
    /// into the backlog, but answers nothing until `"CONT"`).
    pub fn signal(&self, signal: &str) {
        // The shell's own `kill` (a minimal image may have no `/bin/kill`, which is procps').
        let ok = std::process::Command::new("sh")
            .args(["-c", r#"kill -s "$0" "$1""#, signal, &self.child.id().to_string()])
            .status()
            .expect("run sh");
        assert!(ok.success(), "kill -{signal}");
    }

    /// Stop the server for good: its port then refuses connections.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RestCatalogServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A local S3-compatible server (moto) on 127.0.0.1, killed on drop. The server also exits by
/// itself when this process dies.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// A bucket created at start.
    pub bucket: String,
}

impl Moto {
    /// Start moto with `python` and create `bucket`.
    pub fn start(python: &std::path::Path, bucket: &str) -> Moto {
        let (child, port) = start_server(python, "moto_s3.py", &[bucket]);
        Moto { child, endpoint: format!("http://127.0.0.1:{port}"), bucket: bucket.to_string() }
    }

    /// object_store options for this server.
    pub fn options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("aws_endpoint", self.endpoint.clone()),
            ("aws_allow_http", "true".into()),
            ("aws_access_key_id", "testing".into()),
            ("aws_secret_access_key", "testing".into()),
            ("aws_region", "us-east-1".into()),
            ("aws_virtual_hosted_style_request", "false".into()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sleep on the system clock (library rule: no ambient time outside a Clock).
pub async fn sleep(d: Duration) {
    SystemClock::new().sleep(d).await;
}

/// The number of injected failures a fault test must reach: `DOTDO_FAULTS`, at least 200 (the
/// acceptance minimum; a smaller setting cannot make a test vacuous).
#[allow(dead_code)] // not every test binary including this module runs a fault test
pub fn fault_target() -> u64 {
    std::env::var("DOTDO_FAULTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200).max(200)
}

/// What a fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Fail before doing anything.
    FailBefore,
    /// Do the operation, then report failure (the reply was lost).
    FailAfter,
    /// Delay the operation, then do it.
    Delay,
}

/// Wraps a real store and injects faults at random (seeded) into puts, gets, heads, lists and
/// deletes. Faults are reported as `object_store::Error::Generic` (an unreachable store).
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    rng: Mutex<StdRng>,
    /// Probability that an operation is faulted.
    pub probability: f64,
    enabled: AtomicBool,
    /// Failures injected so far (an operation failed, before or after it ran), counted when
    /// the caller got them; delays are counted apart, in `delays`.
    pub injected: Arc<AtomicU64>,
    /// Operations delayed so far (then run normally).
    pub delays: Arc<AtomicU64>,
    /// Writes that ran and whose reply was then lost (FailAfter delivered) so far.
    pub lost_replies: Arc<AtomicU64>,
    /// The paths read (`get_opts`, `get_ranges`) so far, in order.
    pub reads: Mutex<Vec<String>>,
    /// The paths written (`put_opts`, `put_multipart_opts`) so far, in order, faulted or not.
    pub puts: Mutex<Vec<String>>,
    /// Run once, before the first put whose path ends with the given suffix (a concurrent
    /// commit landing at a chosen moment).
    pub before_put: Mutex<Option<PutHook>>,
    /// Run before every put (single or multipart) whose path ends with the given suffix (a
    /// store slow on every such write, on a test's clock).
    pub each_put: Mutex<Option<EachPut>>,
    /// Run once, before the next listing yields its first entry (a concurrent commit landing
    /// while a cleanup lists the table's files).
    /// (The hook's path suffix is not used.)
    pub before_list: Mutex<Option<PutHook>>,
    /// Reads of paths ending with this suffix fail (an outage of part of the store), whatever
    /// `probability` says.
    pub fail_reads_of: Mutex<Option<String>>,
    /// The next `n` puts of paths ending with this suffix fail (before they run), whatever
    /// `probability` says.
    pub fail_puts_of: Mutex<Option<(String, u32)>>,
    /// The next `n` puts of paths ending with this suffix run, then fail (the reply lost),
    /// whatever `probability` says.
    pub lose_puts_of: Mutex<Option<(String, u32)>>,
    /// The next `n` puts of paths containing this text fail (before they run), whatever
    /// `probability` says.
    pub fail_puts_containing: Mutex<Option<(String, u32)>>,
    /// Multipart uploads aborted so far.
    pub aborts: Arc<AtomicU64>,
    /// Run once, before the first read (`get_opts`, `get_ranges`) of a path ending with the given
    /// suffix (another engine's work landing while a file is read).
    pub before_get: Mutex<Option<PutHook>>,
    /// Single puts of more bytes than this fail (a request that cannot finish within the
    /// client's timeout on a slow link); 0: no limit.
    pub max_put_bytes: AtomicU64,
    /// Failed writes of files (puts and multipart completions, as they fire) by kind of file
    /// (see [`file_kind`]): (failures, of which lost replies).
    pub put_faults: PutFaults,
    /// Faults of multipart uploads' parts and completions a test asks for.
    pub uploads: Arc<UploadFaults>,
}

/// Faults of a [`FaultyStore`]'s multipart uploads, whatever `probability` says.
#[derive(Debug, Default)]
pub struct UploadFaults {
    /// Parts started so far (over all uploads).
    pub parts: AtomicU64,
    /// The part with this number (counting from 1, over all uploads) fails; 0: none.
    pub fail_part: AtomicU64,
    /// The part with this number answers `NotFound` (S3's `NoSuchUpload`: the upload expired);
    /// 0: none.
    pub not_found_part: AtomicU64,
    /// The next `n` completions fail before they run.
    pub fail_completes: AtomicU64,
    /// Parts never finish (a stalled link).
    pub hang_parts: AtomicBool,
    /// The next `n` completions answer `NotFound` (S3's `NoSuchUpload`, as to a completion sent
    /// again after the first completed the upload): after completing it if `not_found_lands`.
    pub not_found_completes: AtomicU64,
    pub not_found_lands: AtomicBool,
}

/// Failed file writes by kind of file: (failures, of which lost replies).
pub type PutFaults = Arc<Mutex<std::collections::BTreeMap<&'static str, (u64, u64)>>>;

/// The kind of file at `location`, for [`FaultyStore::put_faults`].
pub fn file_kind(location: &Path) -> &'static str {
    let l = location.as_ref();
    if l.ends_with(".parquet") {
        "data"
    } else if l.ends_with(".metadata.json") {
        "metadata"
    } else if l.contains("dotdo-watermarks-") {
        "checkpoint"
    } else if l.ends_with(".avro") {
        "manifest"
    } else {
        "other"
    }
}

/// Count a fault that fired on a write of `location`.
fn count_put_fault(faults: &PutFaults, location: &Path, fault: Option<Fault>) {
    let lost = match fault {
        Some(Fault::FailBefore) => 0,
        Some(Fault::FailAfter) => 1,
        _ => return,
    };
    let mut f = faults.lock();
    let e = f.entry(file_kind(location)).or_default();
    e.0 += 1;
    e.1 += lost;
}

/// A future run before the first put whose path ends with `.0` (see [`FaultyStore::before_put`]).
pub struct PutHook(pub String, pub futures::future::BoxFuture<'static, ()>);

/// A function run before every put whose path ends with `.0` (see [`FaultyStore::each_put`]).
#[derive(Clone)]
pub struct EachPut(pub String, pub Arc<dyn Fn() + Send + Sync>);

impl fmt::Debug for EachPut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EachPut({:?})", self.0)
    }
}

impl fmt::Debug for PutHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PutHook({:?})", self.0)
    }
}

impl FaultyStore {
    /// Wrap `inner` with a seeded fault generator.
    pub fn new(inner: Arc<dyn ObjectStore>, seed: u64, probability: f64) -> Self {
        FaultyStore {
            inner,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            probability,
            enabled: AtomicBool::new(true),
            injected: Default::default(),
            delays: Default::default(),
            lost_replies: Default::default(),
            reads: Mutex::new(Vec::new()),
            puts: Mutex::new(Vec::new()),
            before_put: Mutex::new(None),
            each_put: Mutex::new(None),
            before_list: Mutex::new(None),
            fail_reads_of: Mutex::new(None),
            fail_puts_of: Mutex::new(None),
            lose_puts_of: Mutex::new(None),
            fail_puts_containing: Mutex::new(None),
            aborts: Arc::new(AtomicU64::new(0)),
            put_faults: Default::default(),
            max_put_bytes: AtomicU64::new(0),
            before_get: Mutex::new(None),
            uploads: Default::default(),
        }
    }

    /// One over local files that injects nothing: it records reads and puts, and takes the
    /// faults a test asks for (`fail_puts_of`, `fail_reads_of`, `before_put`).
    #[allow(dead_code)] // not every test binary including this module uses it
    pub fn quiet_local() -> Arc<Self> {
        Arc::new(FaultyStore::new(Arc::new(object_store::local::LocalFileSystem::new()), 1, 0.0))
    }

    /// Run [`FaultyStore::each_put`] if `location` ends with its suffix.
    fn run_each_put(&self, location: &Path) {
        let each = self.each_put.lock().clone();
        if let Some(EachPut(suffix, f)) = each {
            if location.as_ref().ends_with(suffix.as_str()) {
                f();
            }
        }
    }

    async fn run_before_get(&self, location: &Path) {
        let hook = {
            let mut h = self.before_get.lock();
            match h.as_ref() {
                Some(PutHook(suffix, _)) if location.as_ref().ends_with(suffix.as_str()) => h.take().map(|h| h.1),
                _ => None,
            }
        };
        if let Some(f) = hook {
            f.await;
        }
    }

    /// Turn fault injection on or off.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    fn roll(&self, write: bool) -> Option<Fault> {
        if !self.enabled.load(Ordering::SeqCst) {
            return None;
        }
        let mut rng = self.rng.lock();
        if !rng.gen_bool(self.probability) {
            return None;
        }
        // Counted when delivered ([`Counts::delivered`]): a fault whose operation is never
        // completed (a listing not read, an upload aborted) or whose operation failed by itself
        // reached no one.
        Some(match rng.gen_range(0..3) {
            0 => Fault::FailBefore,
            1 if write => Fault::FailAfter,
            1 => Fault::FailBefore,
            _ => Fault::Delay,
        })
    }

    fn counts(&self) -> Counts {
        Counts { injected: self.injected.clone(), delays: self.delays.clone(), lost_replies: self.lost_replies.clone() }
    }

    fn err(what: &str, location: &Path) -> object_store::Error {
        object_store::Error::Generic {
            store: "Faulty",
            source: format!("injected fault: {what} {location} (connection reset)").into(),
        }
    }

    async fn run<T>(
        &self,
        write: bool,
        what: &str,
        location: &Path,
        op: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        let fault = self.roll(write);
        let put = (what == "put").then_some(&self.put_faults);
        deliver(fault, &self.counts(), put, location, what, op).await
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let hook = {
            let mut h = self.before_put.lock();
            match h.as_ref() {
                Some(PutHook(suffix, _)) if location.as_ref().ends_with(suffix.as_str()) => h.take().map(|h| h.1),
                _ => None,
            }
        };
        if let Some(f) = hook {
            f.await;
        }
        self.run_each_put(location);
        self.puts.lock().push(location.to_string());
        let max = self.max_put_bytes.load(Ordering::SeqCst);
        if max > 0 && payload.content_length() as u64 > max {
            return Err(object_store::Error::Generic {
                store: "faulty",
                source: format!("put of {location}: request timed out ({} bytes)", payload.content_length()).into(),
            });
        }
        {
            let mut fail = self.fail_puts_of.lock();
            if let Some((suffix, n)) = fail.as_mut() {
                if *n > 0 && location.as_ref().ends_with(suffix.as_str()) {
                    *n -= 1;
                    self.injected.fetch_add(1, Ordering::SeqCst);
                    return Err(Self::err("put", location));
                }
            }
        }
        {
            let mut fail = self.fail_puts_containing.lock();
            if let Some((text, n)) = fail.as_mut() {
                if *n > 0 && location.as_ref().contains(text.as_str()) {
                    *n -= 1;
                    self.injected.fetch_add(1, Ordering::SeqCst);
                    return Err(Self::err("put", location));
                }
            }
        }
        let lose = {
            let mut lose = self.lose_puts_of.lock();
            match lose.as_mut() {
                Some((suffix, n)) if *n > 0 && location.as_ref().ends_with(suffix.as_str()) => {
                    *n -= 1;
                    true
                }
                _ => false,
            }
        };
        if lose {
            self.inner.put_opts(location, payload, opts).await?;
            self.injected.fetch_add(1, Ordering::SeqCst);
            self.lost_replies.fetch_add(1, Ordering::SeqCst);
            return Err(Self::err("put", location));
        }
        self.run(true, "put", location, self.inner.put_opts(location, payload, opts)).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.run_each_put(location);
        self.puts.lock().push(location.to_string());
        let inner = self.run(true, "put_multipart", location, self.inner.put_multipart_opts(location, opts)).await?;
        Ok(Box::new(FaultyUpload {
            inner,
            fault: self.roll(true),
            location: location.clone(),
            aborts: self.aborts.clone(),
            uploads: self.uploads.clone(),
            put_faults: self.put_faults.clone(),
            counts: self.counts(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.run_before_get(location).await;
        self.reads.lock().push(location.to_string());
        if self.fail_reads_of.lock().as_deref().is_some_and(|s| location.as_ref().ends_with(s)) {
            return Err(Self::err("get", location));
        }
        self.run(false, "get", location, self.inner.get_opts(location, options)).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        self.run_before_get(location).await;
        self.reads.lock().push(location.to_string());
        if self.fail_reads_of.lock().as_deref().is_some_and(|s| location.as_ref().ends_with(s)) {
            return Err(Self::err("get_ranges", location));
        }
        self.run(false, "get_ranges", location, self.inner.get_ranges(location, ranges)).await
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.run(true, "delete", location, self.inner.delete(location)).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        use futures::StreamExt;
        // Counted once the listing is read (a listing dropped unread delivered nothing).
        match self.roll(false) {
            Some(Fault::Delay) => {
                let (inner, prefix, delays) = (self.inner.clone(), prefix.cloned(), self.delays.clone());
                let pause = async move {
                    delays.fetch_add(1, Ordering::SeqCst);
                    sleep(Duration::from_millis(2)).await
                };
                return futures::stream::once(pause).flat_map(move |()| inner.list(prefix.as_ref())).boxed();
            }
            Some(_) => {
                let (location, injected) = (prefix.cloned().unwrap_or_default(), self.injected.clone());
                return futures::stream::once(async move {
                    injected.fetch_add(1, Ordering::SeqCst);
                    Err(Self::err("list", &location))
                })
                .boxed();
            }
            None => {}
        }
        let Some(hook) = self.before_list.lock().take() else { return self.inner.list(prefix) };
        let (inner, prefix) = (self.inner.clone(), prefix.cloned());
        futures::stream::once(hook.1).flat_map(move |()| inner.list(prefix.as_ref())).boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let location = prefix.cloned().unwrap_or_default();
        self.run(false, "list", &location, self.inner.list_with_delimiter(prefix)).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.run(true, "copy", to, self.inner.copy(from, to)).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.run(true, "copy", to, self.inner.copy_if_not_exists(from, to)).await
    }
}

/// A multipart upload whose completion may fail before completing, fail after it (a lost
/// reply) or be delayed, as rolled when the upload began (and counted when it completes).
#[derive(Debug)]
struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    fault: Option<Fault>,
    location: Path,
    aborts: Arc<AtomicU64>,
    uploads: Arc<UploadFaults>,
    put_faults: PutFaults,
    counts: Counts,
}

/// A [`FaultyStore`]'s fault counters.
#[derive(Debug, Clone)]
struct Counts {
    injected: Arc<AtomicU64>,
    delays: Arc<AtomicU64>,
    lost_replies: Arc<AtomicU64>,
}

/// Run `op` (`what` of `location`) under `fault`, counting the fault only as the caller gets
/// it (a lost reply only if the operation itself succeeded), and in `put` by kind of file.
async fn deliver<T>(
    fault: Option<Fault>,
    counts: &Counts,
    put: Option<&PutFaults>,
    location: &Path,
    what: &str,
    op: impl std::future::Future<Output = object_store::Result<T>>,
) -> object_store::Result<T> {
    let fail = |lost: bool| {
        counts.injected.fetch_add(1, Ordering::SeqCst);
        if lost {
            counts.lost_replies.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(faults) = put {
            count_put_fault(faults, location, Some(if lost { Fault::FailAfter } else { Fault::FailBefore }));
        }
        FaultyStore::err(what, location)
    };
    match fault {
        None => op.await,
        Some(Fault::FailBefore) => Err(fail(false)),
        Some(Fault::FailAfter) => {
            op.await?;
            Err(fail(true))
        }
        Some(Fault::Delay) => {
            counts.delays.fetch_add(1, Ordering::SeqCst);
            sleep(Duration::from_millis(2)).await;
            op.await
        }
    }
}

#[async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let n = self.uploads.parts.fetch_add(1, Ordering::SeqCst) + 1;
        if self.uploads.hang_parts.load(Ordering::SeqCst) {
            return Box::pin(futures::future::pending());
        }
        if self.uploads.fail_part.load(Ordering::SeqCst) == n {
            let location = self.location.clone();
            return Box::pin(async move { Err(FaultyStore::err("put_part", &location)) });
        }
        if self.uploads.not_found_part.load(Ordering::SeqCst) == n {
            let path = self.location.to_string();
            return Box::pin(async move {
                Err(object_store::Error::NotFound {
                    path,
                    source: "<Error><Code>NoSuchUpload</Code></Error> (test)".into(),
                })
            });
        }
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        if self.uploads.fail_completes.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(FaultyStore::err("complete", &self.location));
        }
        if self
            .uploads
            .not_found_completes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            if self.uploads.not_found_lands.load(Ordering::SeqCst) {
                self.inner.complete().await?;
            }
            return Err(object_store::Error::NotFound {
                path: self.location.to_string(),
                source: "Server returned non-2xx status code: 404 Not Found: <Code>NoSuchUpload</Code> (test)".into(),
            });
        }
        let fault = self.fault;
        let (counts, faults, location) = (self.counts.clone(), self.put_faults.clone(), self.location.clone());
        deliver(fault, &counts, Some(&faults), &location, "complete", self.inner.complete()).await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.aborts.fetch_add(1, Ordering::SeqCst);
        self.inner.abort().await
    }
}

/// A catalog whose commits sometimes succeed but report failure (the reply was lost), or fail
/// before doing anything.
#[derive(Debug)]
pub struct LossyCatalog {
    inner: Arc<dyn iceberg::Catalog>,
    rng: parking_lot::Mutex<rand::rngs::StdRng>,
    /// Commits applied whose reply was then lost.
    pub lost: std::sync::atomic::AtomicU64,
    /// Commits refused before doing anything.
    pub failed: std::sync::atomic::AtomicU64,
    /// Whether its errors say "retry" to iceberg (a catalog that marks a broken connection
    /// retryable: iceberg's own commit retry then re-sends the commit on its stale base).
    pub retryable: bool,
    /// Random faults (else only the armed one, see `dotdo_core::testkit::LoseNextReply`).
    pub random: bool,
    /// The reply it is armed to lose.
    pub switch: Arc<dotdo_core::testkit::ReplySwitch>,
    /// While set, every `load_table` fails as a broken connection would (retryable).
    pub fail_loads: std::sync::atomic::AtomicBool,
    /// With `fail_loads`: the loads fail for good instead, as a reply that cannot be parsed (a
    /// proxy's error page) does (not retryable).
    pub loads_fail_for_good: std::sync::atomic::AtomicBool,
    /// The next `load_table` reads the table, sets `load_held`, then waits for this before it
    /// answers (a slow reply carrying what was current when the catalog read it).
    pub hold_next_load: parking_lot::Mutex<Option<Arc<tokio::sync::Notify>>>,
    /// Set once a held `load_table` has read the table.
    pub load_held: std::sync::atomic::AtomicBool,
    /// The next commit fails as a broken connection would, without landing (an unknown
    /// outcome to the caller).
    pub reset_next_update: std::sync::atomic::AtomicBool,
    /// The next commit fails as a broken connection would and lands once this is notified (a
    /// server still at a request its client gave up on); the landing sets `late_landed`.
    pub late_next_update: parking_lot::Mutex<Option<Arc<tokio::sync::Notify>>>,
    pub late_landed: Arc<std::sync::atomic::AtomicBool>,
    /// The next commit after that is refused as a conflict, and every `load_table` fails from
    /// then on (`fail_loads`).
    pub conflict_then_fail_loads: std::sync::atomic::AtomicBool,
    /// Once a commit's reply is lost (armed or random), every `load_table` fails from then on
    /// (`fail_loads`): the table that would tell whether it landed cannot be read.
    pub fail_loads_after_lost: std::sync::atomic::AtomicBool,
    /// Let this many more `load_table` calls through, then fail every one from then on
    /// (`fail_loads`).
    pub fail_loads_after: parking_lot::Mutex<Option<u32>>,
    /// `(loads, change)`: after letting `loads` more `load_table` calls through, at the next
    /// one or at the next commit, whichever comes first, another engine changes the table (see
    /// [`ForeignChange`]): a table that moved since its caller loaded it.
    pub foreign_change: parking_lot::Mutex<Option<(u32, ForeignChange)>>,
}

/// What another engine does to a table behind a [`LossyCatalog`]'s caller.
#[derive(Clone, Copy, Debug)]
pub enum ForeignChange {
    /// Roll the main branch back to this snapshot, then append on it (an empty snapshot).
    RollBackAndAppend(i64),
    /// Tag this snapshot (tag `t`), then change a table property (a new metadata file).
    Tag(i64),
}

impl LossyCatalog {
    /// Another engine's `change` of `ident`.
    async fn change(&self, ident: &iceberg::TableIdent, change: ForeignChange) -> iceberg::Result<()> {
        use iceberg::transaction::{ApplyTransactionAction, Transaction};
        let table = self.inner.load_table(ident).await?;
        edit_metadata(table.metadata_location().expect("a metadata file"), |json| match change {
            ForeignChange::RollBackAndAppend(snapshot) => {
                json["current-snapshot-id"] = serde_json::json!(snapshot);
                json["refs"]["main"]["snapshot-id"] = serde_json::json!(snapshot);
            }
            ForeignChange::Tag(snapshot) => {
                json["refs"]["t"] = serde_json::json!({"snapshot-id": snapshot, "type": "tag"});
            }
        });
        let table = self.inner.load_table(ident).await?;
        let tx = Transaction::new(&table);
        let tx = match change {
            ForeignChange::RollBackAndAppend(_) => {
                let props = std::collections::HashMap::from([("engine".to_string(), "another".to_string())]);
                tx.fast_append().set_snapshot_properties(props).apply(tx)?
            }
            ForeignChange::Tag(_) => tx.update_table_properties().set("engine".into(), "another".into()).apply(tx)?,
        };
        tx.commit(&*self.inner).await.map(|_| ())
    }
}

#[async_trait::async_trait]
impl iceberg::Catalog for LossyCatalog {
    async fn list_namespaces(
        &self,
        p: Option<&iceberg::NamespaceIdent>,
    ) -> iceberg::Result<Vec<iceberg::NamespaceIdent>> {
        self.inner.list_namespaces(p).await
    }
    async fn create_namespace(
        &self,
        n: &iceberg::NamespaceIdent,
        p: std::collections::HashMap<String, String>,
    ) -> iceberg::Result<iceberg::Namespace> {
        self.inner.create_namespace(n, p).await
    }
    async fn get_namespace(&self, n: &iceberg::NamespaceIdent) -> iceberg::Result<iceberg::Namespace> {
        self.inner.get_namespace(n).await
    }
    async fn namespace_exists(&self, n: &iceberg::NamespaceIdent) -> iceberg::Result<bool> {
        self.inner.namespace_exists(n).await
    }
    async fn update_namespace(
        &self,
        n: &iceberg::NamespaceIdent,
        p: std::collections::HashMap<String, String>,
    ) -> iceberg::Result<()> {
        self.inner.update_namespace(n, p).await
    }
    async fn drop_namespace(&self, n: &iceberg::NamespaceIdent) -> iceberg::Result<()> {
        self.inner.drop_namespace(n).await
    }
    async fn list_tables(&self, n: &iceberg::NamespaceIdent) -> iceberg::Result<Vec<iceberg::TableIdent>> {
        self.inner.list_tables(n).await
    }
    async fn create_table(
        &self,
        n: &iceberg::NamespaceIdent,
        c: iceberg::TableCreation,
    ) -> iceberg::Result<iceberg::table::Table> {
        self.inner.create_table(n, c).await
    }
    async fn load_table(&self, t: &iceberg::TableIdent) -> iceberg::Result<iceberg::table::Table> {
        {
            let mut after = self.fail_loads_after.lock();
            match after.as_mut() {
                Some(0) => {
                    *after = None;
                    self.fail_loads.store(true, Ordering::SeqCst);
                }
                Some(n) => *n -= 1,
                None => {}
            }
        }
        if self.fail_loads.load(Ordering::SeqCst) && self.loads_fail_for_good.load(Ordering::SeqCst) {
            return Err(iceberg::Error::new(
                iceberg::ErrorKind::DataInvalid,
                "injected: failed to parse response from rest catalog server (an HTML error page)",
            ));
        }
        if self.fail_loads.load(Ordering::SeqCst) {
            return Err(iceberg::Error::new(iceberg::ErrorKind::Unexpected, "Failed to execute http request")
                .with_source(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected: connection reset"))
                .with_retryable(true));
        }
        let change = {
            let mut r = self.foreign_change.lock();
            match r.as_mut() {
                Some((0, change)) => {
                    let change = *change;
                    *r = None;
                    Some(change)
                }
                Some((loads, _)) => {
                    *loads -= 1;
                    None
                }
                None => None,
            }
        };
        if let Some(change) = change {
            self.change(t, change).await?;
        }
        let held = self.hold_next_load.lock().take();
        let table = self.inner.load_table(t).await?;
        if let Some(release) = held {
            self.load_held.store(true, Ordering::SeqCst);
            release.notified().await;
        }
        Ok(table)
    }
    async fn drop_table(&self, t: &iceberg::TableIdent) -> iceberg::Result<()> {
        self.inner.drop_table(t).await
    }
    async fn purge_table(&self, t: &iceberg::TableIdent) -> iceberg::Result<()> {
        self.inner.purge_table(t).await
    }
    async fn table_exists(&self, t: &iceberg::TableIdent) -> iceberg::Result<bool> {
        self.inner.table_exists(t).await
    }
    async fn rename_table(&self, a: &iceberg::TableIdent, b: &iceberg::TableIdent) -> iceberg::Result<()> {
        self.inner.rename_table(a, b).await
    }
    async fn register_table(&self, t: &iceberg::TableIdent, m: String) -> iceberg::Result<iceberg::table::Table> {
        self.inner.register_table(t, m).await
    }
    async fn update_table(&self, c: iceberg::TableCommit) -> iceberg::Result<iceberg::table::Table> {
        use rand::Rng;
        let roll: u32 = self.rng.lock().gen_range(0..10);
        // As iceberg-catalog-rest reports a connection that broke (its reqwest error's source).
        let reset = || {
            iceberg::Error::new(iceberg::ErrorKind::Unexpected, "Failed to execute http request")
                .with_source(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected: connection reset"))
                .with_retryable(self.retryable)
        };
        // A commit failed before it was sent (the kit's failed-commit case): nothing applied.
        if self.switch.take_failure() {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(reset());
        }
        let armed = self.switch.take_armed();
        let change = self.foreign_change.lock().take();
        if let Some((_, change)) = change {
            self.change(c.identifier(), change).await?;
        }
        if self.reset_next_update.swap(false, Ordering::SeqCst) {
            return Err(reset());
        }
        let late = self.late_next_update.lock().take();
        if let Some(gate) = late {
            let (inner, landed) = (self.inner.clone(), self.late_landed.clone());
            tokio::spawn(async move {
                gate.notified().await;
                inner.update_table(c).await.expect("the late commit lands");
                landed.store(true, Ordering::SeqCst);
            });
            return Err(reset());
        }
        if self.conflict_then_fail_loads.swap(false, Ordering::SeqCst) {
            self.fail_loads.store(true, Ordering::SeqCst);
            return Err(iceberg::Error::new(iceberg::ErrorKind::CatalogCommitConflicts, "injected: conflict"));
        }
        match roll {
            _ if armed => {
                self.inner.update_table(c).await?;
                self.lost.fetch_add(1, Ordering::SeqCst);
                if self.fail_loads_after_lost.load(Ordering::SeqCst) {
                    self.fail_loads.store(true, Ordering::SeqCst);
                }
                Err(reset())
            }
            _ if !self.random => self.inner.update_table(c).await,
            0 | 1 => {
                self.inner.update_table(c).await?;
                self.lost.fetch_add(1, Ordering::SeqCst);
                Err(reset())
            }
            2 => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                Err(reset())
            }
            _ => self.inner.update_table(c).await,
        }
    }
}

/// A [`LossyCatalog`] over the SQL catalog at `uri`, as a custom catalog for the builder, and the
/// slot that holds it once built (for its counters).
#[allow(dead_code)] // not every test binary including this module uses it
pub fn lossy_sql_catalog(
    uri: String,
    warehouse: String,
    seed: u64,
) -> (dotdo_iceberg::catalog::CustomCatalog, Arc<Mutex<Option<Arc<LossyCatalog>>>>) {
    lossy_sql_catalog_with(uri, warehouse, seed, false)
}

/// A [`LossyCatalog`] over the SQL catalog at `uri` that loses only the replies it is armed to
/// lose (the conformance kit's `LoseNextReply`).
#[allow(dead_code)] // not every test binary including this module uses it
pub fn switched_sql_catalog(
    uri: String,
    warehouse: String,
) -> (dotdo_iceberg::catalog::CustomCatalog, Arc<Mutex<Option<Arc<LossyCatalog>>>>) {
    lossy_catalog(uri, warehouse, 0, false, false)
}

/// A kit fault fixture: a store at `warehouse` (with object-store `options`), its SQL catalog in
/// `dir` behind [`switched_sql_catalog`], whose switch is the fixture's.
#[allow(dead_code)] // not every test binary including this module uses it
pub async fn switched_fault_fixture(
    dir: tempfile::TempDir,
    warehouse: String,
    options: Vec<(&'static str, String)>,
    clock: dotdo_core::ManualClock,
) -> dotdo_core::testkit::ColdFaultFixture {
    let uri = dotdo_iceberg::catalog::default_sqlite_uri(dir.path());
    let (build, slot) = switched_sql_catalog(uri, warehouse.clone());
    let store = dotdo_iceberg::IcebergColdStore::builder(warehouse)
        .options(options)
        .catalog(dotdo_iceberg::CatalogConfig::Custom(build))
        .table(["kit"], "changes")
        .with_clock(Arc::new(clock))
        .build()
        .await
        .expect("open the iceberg cold store");
    let lose = slot.lock().clone().expect("the catalog was built");
    dotdo_core::testkit::ColdFaultFixture {
        fixture: dotdo_core::testkit::ColdFixture {
            sink: Arc::new(store.clone()),
            accel: Some(Arc::new(store)),
            keep_alive: Box::new(dir),
        },
        lose_next_reply: lose.switch.clone(),
    }
}

/// [`lossy_sql_catalog`] whose errors are `retryable` to iceberg or not.
#[allow(dead_code)] // not every test binary including this module uses it
pub fn lossy_sql_catalog_with(
    uri: String,
    warehouse: String,
    seed: u64,
    retryable: bool,
) -> (dotdo_iceberg::catalog::CustomCatalog, Arc<Mutex<Option<Arc<LossyCatalog>>>>) {
    lossy_catalog(uri, warehouse, seed, retryable, true)
}

fn lossy_catalog(
    uri: String,
    warehouse: String,
    seed: u64,
    retryable: bool,
    random: bool,
) -> (dotdo_iceberg::catalog::CustomCatalog, Arc<Mutex<Option<Arc<LossyCatalog>>>>) {
    let lossy: Arc<Mutex<Option<Arc<LossyCatalog>>>> = Arc::default();
    let slot = lossy.clone();
    let build: dotdo_iceberg::catalog::CustomCatalog = Arc::new(move |factory| {
        let (uri, warehouse, slot) = (uri.clone(), warehouse.clone(), slot.clone());
        Box::pin(async move {
            use iceberg::CatalogBuilder;
            let sql = iceberg_catalog_sql::SqlCatalogBuilder::default()
                .uri(uri)
                .warehouse_location(warehouse)
                .sql_bind_style(iceberg_catalog_sql::SqlBindStyle::QMark)
                .with_storage_factory(factory)
                .load("dotdo", std::collections::HashMap::new())
                .await
                .map_err(|e| dotdo_core::Error::backend(e.to_string()))?;
            let c = Arc::new(LossyCatalog {
                inner: Arc::new(sql),
                rng: parking_lot::Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
                lost: Default::default(),
                failed: Default::default(),
                retryable,
                random,
                switch: Default::default(),
                fail_loads: Default::default(),
                loads_fail_for_good: Default::default(),
                hold_next_load: Default::default(),
                load_held: Default::default(),
                reset_next_update: Default::default(),
                late_next_update: Default::default(),
                late_landed: Default::default(),
                conflict_then_fail_loads: Default::default(),
                fail_loads_after_lost: Default::default(),
                fail_loads_after: Default::default(),
                foreign_change: Default::default(),
            });
            *slot.lock() = Some(c.clone());
            Ok(c as Arc<dyn iceberg::Catalog>)
        })
    });
    (build, lossy)
}

/// Rows in the live data files of the table's head snapshot (what a reader that keeps duplicate
/// rows would see; dotdo's own reads keep one row per sequence number).
#[allow(dead_code)] // not every test binary including this module uses it
pub async fn live_rows(cold: &dotdo_iceberg::IcebergColdStore) -> u64 {
    let table = cold.refresh().await.expect("refresh");
    let Some(head) = table.metadata().current_snapshot() else { return 0 };
    let list = table.manifest_list_reader(head).load().await.expect("manifest list");
    let mut rows = 0;
    for mf in list.entries() {
        let m = mf.load_manifest(table.file_io()).await.expect("manifest");
        rows += m.entries().iter().filter(|e| e.is_alive()).map(|e| e.data_file().record_count()).sum::<u64>();
    }
    rows
}

/// Create the table `u.events` of one non-null `id` column (`Int32`) in format version 1 through
/// `cold`'s catalog, as another engine would (dotdo creates version 2 tables).
#[allow(dead_code)] // not every test binary including this module uses it
pub async fn create_v1_events_table(cold: &dotdo_iceberg::IcebergColdStore) {
    let arrow = arrow_schema::Schema::new(vec![arrow_schema::Field::new("id", arrow_schema::DataType::Int32, false)]);
    let schema = iceberg::arrow::arrow_schema_to_schema_auto_assign_ids(&arrow).expect("schema");
    let ns = iceberg::NamespaceIdent::new("u".into());
    cold.catalog().create_namespace(&ns, Default::default()).await.expect("namespace");
    let creation = iceberg::TableCreation::builder()
        .name("events".into())
        .schema(schema)
        .format_version(iceberg::spec::FormatVersion::V1)
        .build();
    cold.catalog().create_table(&ns, creation).await.expect("a version 1 table");
}
