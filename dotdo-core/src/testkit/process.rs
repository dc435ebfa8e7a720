//! Multi-process tests shared by every file-backed hot backend: cross-process fencing under
//! contention and SIGKILL crash recovery. Real OS processes, real files.
//!
//! The test binary re-executes itself as the child: a backend's test file defines a parent test
//! and a child entry test, e.g.
//!
//! ```text
//! #[test] fn cross_process_fencing() { process::fencing_contention(&kit(), "process_child") }
//! #[test] fn sigkill_crash_recovery() { process::crash_recovery(&kit(), "process_child") }
//! #[test] fn process_child() { process::child_main(&kit()) } // no-op unless spawned as a child
//! ```

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::{nid, oid, runtime};
use crate::error::{ErrorKind, Result};
use crate::hot::HotStoreExt;
use crate::time::{Clock, SystemClock};
use crate::{ConsistencyGuard, HotStore, Lease};

/// SIGKILL `child` and reap it, asserting that the signal is what ended it: `Child::kill`
/// succeeds on a child that already exited (a panic, an early return), which would otherwise be
/// counted as a crash injected. Crash tests count only kills confirmed this way.
#[cfg(unix)]
pub fn sigkill(child: &mut Child, what: &str) {
    use std::os::unix::process::ExitStatusExt;
    child.kill().unwrap_or_else(|e| panic!("{what}: SIGKILL: {e}"));
    let status = child.wait().unwrap_or_else(|e| panic!("{what}: reaping the child: {e}"));
    assert_eq!(status.signal(), Some(9), "{what}: the child ended on its own ({status}), not by the SIGKILL");
}

/// A child process that is killed (SIGKILL) and reaped when dropped, unless it has already
/// ended: a test that fails before it kills its children (a panic on a deadline) leaves no
/// process running on after it. Dereferences to the [`Child`].
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs `cmd` to its end as [`Command::output`] does, but for at most `limit`: a child still
/// running then (a Python interpreter hung on a lock, a tool waiting on a closed terminal) is
/// killed and the test fails naming `what` with the output it had written, instead of holding
/// the test binary (and CI) until the job's own time limit.
#[allow(clippy::disallowed_methods)] // a test helper's wall-clock wait for a real process
pub fn output_within(cmd: &mut Command, limit: Duration, what: &str) -> std::process::Output {
    use std::io::Read;
    let mut child = KillOnDrop(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: start: {e}")),
    );
    // Both pipes drained on threads of their own: a child filling one pipe's buffer while this
    // waits on it would otherwise never end.
    // Received with a bound: a grandchild that inherited a pipe can hold it open past the child.
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::sync::mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            let _ = tx.send(buf);
        });
        rx
    }
    let grace = Duration::from_secs(10);
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let (out, err) =
                    (out.recv_timeout(grace).unwrap_or_default(), err.recv_timeout(grace).unwrap_or_default());
                panic!(
                    "{what}: still running after {limit:?}, killed\nstdout: {}\nstderr: {}",
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(&err)
                );
            }
            Err(e) => panic!("{what}: waiting for the child: {e}"),
        }
    };
    let stdout = out.recv_timeout(grace).unwrap_or_else(|e| panic!("{what}: stdout not closed after the exit: {e}"));
    let stderr = err.recv_timeout(grace).unwrap_or_else(|e| panic!("{what}: stderr not closed after the exit: {e}"));
    std::process::Output { status, stdout, stderr }
}

/// Opens (creating if needed) the backend's database at a path, on the system clock.
pub type Opener =
    Arc<dyn Fn(PathBuf) -> BoxFuture<'static, Result<(Arc<dyn HotStore>, Arc<dyn ConsistencyGuard>)>> + Send + Sync>;
/// Checks the physical integrity of the database at a path (e.g. `PRAGMA integrity_check`).
pub type IntegrityCheck = Arc<dyn Fn(PathBuf) -> BoxFuture<'static, Result<()>> + Send + Sync>;

/// What a backend provides to the process tests.
#[derive(Clone)]
pub struct ProcessKit {
    /// Opens the database.
    pub open: Opener,
    /// Checks the file's integrity after a crash.
    pub integrity: IntegrityCheck,
}

const ENV_MODE: &str = "DOTDO_KIT_CHILD";
const ENV_DB: &str = "DOTDO_KIT_DB";
const ENV_NODE: &str = "DOTDO_KIT_NODE";

/// A small xorshift generator (tests must not depend on ambient randomness crates).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn seed() -> u64 {
    let t = SystemClock::new().now().as_micros() as u64;
    t ^ (u64::from(std::process::id()) << 32)
}

fn spawn_child(child_test: &str, mode: &str, db: &Path, node: &str) -> KillOnDrop {
    let exe = std::env::current_exe().expect("test binary path");
    let child = Command::new(exe)
        .args([child_test, "--exact", "--nocapture", "--test-threads=1", "--quiet"])
        .env(ENV_MODE, mode)
        .env(ENV_DB, db)
        .env(ENV_NODE, node)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning a child test process");
    KillOnDrop(child)
}

/// Lines a child printed that start with `DOTDO `, without the prefix, collected by a thread.
struct Lines {
    rx: std::sync::mpsc::Receiver<String>,
    handle: std::thread::JoinHandle<()>,
}

fn collect(child: &mut Child) -> Lines {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if let Some(rest) = line.strip_prefix("DOTDO ") {
                if tx.send(rest.to_string()).is_err() {
                    break;
                }
            }
        }
    });
    Lines { rx, handle }
}

/// The child side: does nothing unless this process was spawned by a process test.
pub fn child_main(kit: &ProcessKit) {
    let Ok(mode) = std::env::var(ENV_MODE) else { return };
    let db = PathBuf::from(std::env::var(ENV_DB).expect("child needs DOTDO_KIT_DB"));
    let node = std::env::var(ENV_NODE).expect("child needs DOTDO_KIT_NODE");
    let rt = runtime();
    rt.block_on(async {
        let (hot, guard) = (kit.open)(db).await.expect("child opens the database");
        match mode.as_str() {
            "fence" => fence_child(hot, guard, &node).await,
            "crash" => crash_child(hot, guard, &node, false).await,
            "crash-at-grant" => crash_child(hot, guard, &node, true).await,
            other => panic!("unknown child mode {other}"),
        }
    });
}

const FENCE_OBJECTS: u64 = 3;
const FENCE_TTL: Duration = Duration::from_millis(150);

async fn acquire_retrying(guard: &dyn ConsistencyGuard, object: &crate::ObjectId, node: &str, ttl: Duration) -> Lease {
    let clock = SystemClock::new();
    loop {
        match guard.acquire(object, &nid(node), ttl).await {
            Ok(l) => return l,
            Err(e) if matches!(e.kind(), ErrorKind::LeaseHeld { .. }) || e.is_retryable() => {
                clock.sleep(Duration::from_millis(3)).await;
            }
            Err(e) => panic!("acquire failed: {e}"),
        }
    }
}

async fn fence_child(hot: Arc<dyn HotStore>, guard: Arc<dyn ConsistencyGuard>, node: &str) {
    let iterations: u64 = std::env::var("DOTDO_FENCE_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(25);
    let clock = SystemClock::new();
    let mut rng = Rng::new(seed());
    for _ in 0..iterations {
        let object = oid(&format!("counter-{}", rng.below(FENCE_OBJECTS)));
        let lease = acquire_retrying(&*guard, &object, node, FENCE_TTL).await;
        // When the grant was in hand, on the wall clock every process on this machine shares.
        println!("DOTDO GRANT {object} {} {}", lease.token, clock.now().as_micros());
        let current: u64 = match hot.get(&object, "n").await {
            Ok(v) => v.map(|b| String::from_utf8_lossy(&b).parse().expect("counter is a number")).unwrap_or(0),
            Err(e) => {
                println!("DOTDO ERR read {} {e}", if e.is_retryable() { "retryable" } else { "permanent" });
                continue;
            }
        };
        if rng.below(100) < 25 {
            // A pause longer than the TTL: another process will usually take over meanwhile.
            clock.sleep(FENCE_TTL * 2).await;
        }
        let next = current + 1;
        // A busy moment (retryable) is retried, a bounded number of times: a stale write must end
        // `Fenced`, which the parent then checks; refused as retryable it would go uncounted.
        // The time reported is the last attempt's (the one whose answer is reported).
        let mut tries = 0;
        let (written, sent) = loop {
            let sent = clock.now().as_micros();
            match hot.put(&object, lease.token, "Counter", "n", Bytes::from(next.to_string())).await {
                Err(e) if e.is_retryable() && tries < 100 => {
                    tries += 1;
                    clock.sleep(Duration::from_millis(3)).await;
                }
                other => break (other, sent),
            }
        };
        match written {
            Ok(_) => println!("DOTDO ACK {object} {} {next} {sent}", lease.token),
            Err(e) if e.is_fenced() => println!("DOTDO FENCED {object} {} {sent}", lease.token),
            Err(e) => println!("DOTDO ERR write {} {e}", if e.is_retryable() { "retryable" } else { "permanent" }),
        }
        let _ = guard.release(&lease).await;
    }
    println!("DOTDO DONE");
}

/// At least 4 OS processes contend for 3 counters on one database file; each holder sometimes
/// pauses past its TTL before its read-modify-write. Asserts: zero stale writes accepted (every
/// accepted increment follows the previous value, tokens never go down along the change log,
/// and no write was accepted that was sent, by the machine's wall clock, after a newer lease of
/// its object had been granted: a check and write that are not one atomic step let such a
/// write through whenever the new holder had not written yet), and each final counter equals
/// its number of acknowledged increments.
pub fn fencing_contention(kit: &ProcessKit, child_test: &str) {
    let dir = tempfile_dir();
    let db = dir.join("fence.db");
    let rt = runtime();
    rt.block_on(async { (kit.open)(db.clone()).await.expect("create database") });
    let procs: usize = std::env::var("DOTDO_FENCE_PROCS").ok().and_then(|v| v.parse().ok()).unwrap_or(4).max(4);
    let children: Vec<(KillOnDrop, Lines)> = (0..procs)
        .map(|i| {
            let mut c = spawn_child(child_test, "fence", &db, &format!("proc-{i}"));
            let l = collect(&mut c);
            (c, l)
        })
        .collect();
    let mut acks: BTreeMap<String, u64> = BTreeMap::new();
    // Each acknowledged write: (object, value) -> (token, child).
    let mut acked_writes: BTreeMap<(String, u64), (u64, usize)> = BTreeMap::new();
    // Each acknowledged write as (object, token, sent at), and each grant as (object, token,
    // granted at), in wall-clock microseconds.
    let mut sends: Vec<(String, u64, i64)> = Vec::new();
    let mut grants: Vec<(String, u64, i64)> = Vec::new();
    // Each write refused as `Fenced`, as (object, token, sent at).
    let mut refused_sends: Vec<(String, u64, i64)> = Vec::new();
    let mut children_acking = std::collections::BTreeSet::new();
    let (mut fenced, mut done, mut retryable) = (0, 0, 0);
    let mut permanent: Vec<String> = Vec::new();
    // A child that never ends (leases that never free up, a database that stays busy: each child
    // retries its acquire for as long as it is refused) fails the test instead of hanging CI.
    let clock = SystemClock::new();
    let deadline = clock.monotonic() + Duration::from_secs(300);
    for (child_index, (mut child, lines)) in children.into_iter().enumerate() {
        let status = loop {
            if let Some(status) = child.try_wait().expect("child status") {
                break status;
            }
            assert!(clock.monotonic() < deadline, "a contending child still runs after 300 s");
            std::thread::park_timeout(Duration::from_millis(20));
        };
        assert!(status.success(), "a contending child failed: {status}");
        // All of the child's output is in once its reader has seen the pipe close.
        let _ = lines.handle.join();
        for line in lines.rx.try_iter() {
            let parts: Vec<&str> = line.split(' ').collect();
            match parts[0] {
                "ACK" => {
                    *acks.entry(parts[1].to_string()).or_default() += 1;
                    let number =
                        |i: usize| parts.get(i).and_then(|v| v.parse::<u64>().ok()).expect("ACK object token value");
                    let previous = acked_writes.insert((parts[1].to_string(), number(3)), (number(2), child_index));
                    assert!(previous.is_none(), "value {} of {} acknowledged twice", number(3), parts[1]);
                    children_acking.insert(child_index);
                    let sent = parts.get(4).and_then(|v| v.parse::<i64>().ok()).expect("ACK sent-at");
                    sends.push((parts[1].to_string(), number(2), sent));
                }
                "GRANT" => {
                    let token = parts.get(2).and_then(|v| v.parse::<u64>().ok()).expect("GRANT token");
                    let at = parts.get(3).and_then(|v| v.parse::<i64>().ok()).expect("GRANT time");
                    grants.push((parts[1].to_string(), token, at));
                }
                "FENCED" => {
                    fenced += 1;
                    let token = parts.get(2).and_then(|v| v.parse::<u64>().ok()).expect("FENCED token");
                    let sent = parts.get(3).and_then(|v| v.parse::<i64>().ok()).expect("FENCED sent-at");
                    refused_sends.push((parts[1].to_string(), token, sent));
                }
                "DONE" => done += 1,
                "ERR" if parts.get(2) == Some(&"retryable") => retryable += 1,
                "ERR" => permanent.push(line.clone()),
                _ => {}
            }
        }
    }
    assert_eq!(done, procs, "every child finished");
    // Every grant has a token of its own per object: a token handed out twice (two holders at
    // once) fails here even when one of them was later refused as stale.
    let mut granted: std::collections::BTreeMap<(&str, u64), i64> = std::collections::BTreeMap::new();
    for (object, token, at) in &grants {
        if let Some(earlier) = granted.insert((object.as_str(), *token), *at) {
            panic!("{object}: token {token} was granted twice (at {earlier} us and at {at} us)");
        }
    }
    assert!(!granted.is_empty(), "no grant was reported");
    // No write was accepted that was sent after a newer lease of its object was granted (a
    // millisecond of slack for the clock reads around the calls). Some refused ones were: the
    // case arose.
    let newer_granted = |object: &String, token: &u64, sent: &i64| {
        grants.iter().find(|(o, t, at)| o == object && t > token && at + 1_000 < *sent)
    };
    let arose = refused_sends.iter().filter(|(o, t, s)| newer_granted(o, t, s).is_some()).count();
    // And every refusal had a reason: a newer lease of the same object (a floor taken across
    // objects refused current holders' writes as `Fenced`, and passed every other check).
    for (object, token, sent) in &refused_sends {
        assert!(
            grants.iter().any(|(o, t, _)| o == object && t > token),
            "{object}: a write under token {token} sent at {sent} us was refused as Fenced, but no newer lease was granted"
        );
    }
    assert!(arose > 0, "no write was sent after a newer grant ({fenced} refused)");
    for (object, token, sent) in &sends {
        let newer = newer_granted(object, token, sent);
        assert!(
            newer.is_none(),
            "{object}: a write under token {token} sent at {sent} us was accepted after token {} was granted at {} us",
            newer.map_or(0, |g| g.1),
            newer.map_or(0, |g| g.2)
        );
    }
    // A stale write must be refused as `Fenced`, nothing else; busy moments are retryable.
    assert!(permanent.is_empty(), "calls failed with a non-retryable error other than Fenced: {permanent:?}");
    // Holders pausing past the TTL while others wait for the same counters: some stale writes
    // must have been attempted, or the test proved nothing about fencing.
    assert!(fenced > 0, "no stale write was attempted ({retryable} retryable errors)");
    // Every child got writes in: the processes contended, none finished before the others began.
    assert_eq!(children_acking.len(), procs, "children with acknowledged writes");
    rt.block_on(async {
        let (hot, _) = (kit.open)(db.clone()).await.expect("reopen");
        let mut total = 0;
        for i in 0..FENCE_OBJECTS {
            let object = oid(&format!("counter-{i}"));
            let acked = acks.get(object.as_str()).copied().unwrap_or(0);
            let value: u64 = hot
                .get(&object, "n")
                .await
                .expect("read counter")
                .map(|b| String::from_utf8_lossy(&b).parse().expect("number"))
                .unwrap_or(0);
            assert_eq!(value, acked, "{object}: final counter {value} but {acked} acknowledged increments");
            let log = super::hot::changes(&*hot, &object, 0, usize::MAX).await.expect("change log");
            assert_eq!(log.len() as u64, acked, "{object}: every accepted write is in the change log");
            // Each lease writes once (acquire, one put, release), so tokens strictly rise along
            // the log: a stale holder's write after a newer one, or a token handed out twice,
            // breaks the order. Each entry is the acknowledged write of its value, under the token
            // its child reported.
            let mut last_token = crate::FencingToken::NONE;
            for (i, c) in log.iter().enumerate() {
                let v: u64 = String::from_utf8_lossy(&c.value).parse().expect("number");
                assert_eq!(v, i as u64 + 1, "{object}: a stale write was accepted at seq {}", c.seq);
                assert!(c.token > last_token, "{object}: token {} after {} at seq {}", c.token, last_token, c.seq);
                last_token = c.token;
                let acked = acked_writes.get(&(object.as_str().to_string(), v)).map(|(token, _)| *token);
                assert_eq!(acked, Some(c.token.get()), "{object}: the write of value {v} is not the one acknowledged");
            }
            total += acked;
        }
        println!(
            "fencing: {procs} processes, {total} acknowledged increments, {fenced} stale writes rejected \
             ({arose} of them sent after a newer grant)"
        );
        assert!(total > 0, "no increment was acknowledged");
    });
    let _ = std::fs::remove_dir_all(&dir);
}

const CRASH_TTL: Duration = Duration::from_millis(200);

/// The crash test's writer; with `hold_after_grant`, it reports its lease and then waits to be
/// killed, writing nothing.
async fn crash_child(hot: Arc<dyn HotStore>, guard: Arc<dyn ConsistencyGuard>, node: &str, hold_after_grant: bool) {
    let object = oid("crash-obj");
    let clock = SystemClock::new();
    let mut lease = acquire_retrying(&*guard, &object, node, CRASH_TTL).await;
    println!("DOTDO TOKEN {}", lease.token);
    if hold_after_grant {
        return std::future::pending().await;
    }
    let mut i = hot.object_info(&object).await.expect("info").map_or(0, |info| info.last_seq);
    let mut rng = Rng::new(seed());
    loop {
        if lease.remaining_at(clock.now()) < CRASH_TTL / 2 {
            lease = match guard.refresh(&lease, CRASH_TTL).await {
                Ok(l) => l,
                // A stall past the TTL (a loaded machine): no other writer runs in this round,
                // so take the object again under a new, larger token.
                Err(e) if matches!(e.kind(), ErrorKind::LeaseLost { .. }) => {
                    let l = acquire_retrying(&*guard, &object, node, CRASH_TTL).await;
                    println!("DOTDO TOKEN {}", l.token);
                    l
                }
                Err(e) => panic!("refresh while alive: {e}"),
            };
        }
        // Batches of 1..=4 puts; key k{seq} holds "{seq}/{the batch's last seq}", so that the
        // parent can tell a batch applied in part.
        let n = 1 + rng.below(4);
        let mut batch = crate::WriteBatch::new("Crash");
        for j in 1..=n {
            batch = batch.put(format!("k{}", i + j), Bytes::from(format!("{}/{}", i + j, i + n)));
        }
        println!("DOTDO W {}", i + 1);
        let r = hot.write(&object, lease.token, batch).await.expect("write while holding the lease");
        assert_eq!(r.first_seq, i + 1);
        i = r.last_seq;
        println!("DOTDO ACK {i}");
    }
}

/// A writer process is killed with SIGKILL at random moments (`DOTDO_CRASH_KILLS`, default 20,
/// at least 20); after each kill every acknowledged write is present with its value, tokens only go
/// up, sequence numbers are gap-free and the backend's integrity check passes. One round in five
/// (after the first) kills a writer that reports its lease and then writes nothing: the token it
/// was granted must have been stored (the object reports it, and the next writer's is larger),
/// not derived from the highest token written. (Killed as soon as it reported the lease, a
/// writer on a loaded machine had often written under it already.)
pub fn crash_recovery(kit: &ProcessKit, child_test: &str) {
    let kills: usize = std::env::var("DOTDO_CRASH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(20).max(20);
    let dir = tempfile_dir();
    let db = dir.join("crash.db");
    let rt = runtime();
    let clock = SystemClock::new();
    let mut rng = Rng::new(seed());
    let mut max_acked = 0u64;
    let mut last_token = 0u64;
    // Rounds whose child was killed with a write in flight (its last line a `W`, no `ACK` after).
    let mut killed_mid_write = 0;
    // Rounds whose child was killed as soon as it reported its token.
    let mut killed_at_the_grant = 0;
    for round in 0..kills {
        let at_the_grant = round % 5 == 2;
        let mode = if at_the_grant { "crash-at-grant" } else { "crash" };
        let mut child = spawn_child(child_test, mode, &db, &format!("writer-{round}"));
        let lines = collect(&mut child);
        // Wait for the child to start writing, then let it run a random while.
        let mut token = None;
        let mut acked_this_round = 0;
        let deadline = Duration::from_secs(30);
        let started = clock.monotonic();
        while if at_the_grant { token.is_none() } else { acked_this_round == 0 } {
            assert!(clock.monotonic() - started < deadline, "round {round}: child never acknowledged a write");
            if let Ok(line) = lines.rx.recv_timeout(Duration::from_millis(50)) {
                if let Some(t) = line.strip_prefix("TOKEN ") {
                    token = Some(t.parse::<u64>().expect("token"));
                } else if let Some(a) = line.strip_prefix("ACK ") {
                    max_acked = max_acked.max(a.parse().expect("seq"));
                    acked_this_round += 1;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("round {round}: child exited early: {status}");
            }
        }
        if at_the_grant {
            killed_at_the_grant += 1;
        } else {
            std::thread::sleep(Duration::from_millis(5 + rng.below(120)));
        }
        sigkill(&mut child, &format!("round {round}"));
        let _ = lines.handle.join();
        let mut in_flight = false;
        for line in lines.rx.try_iter() {
            if let Some(a) = line.strip_prefix("ACK ") {
                max_acked = max_acked.max(a.parse().expect("seq"));
                in_flight = false;
            } else if let Some(t) = line.strip_prefix("TOKEN ") {
                token = Some(t.parse().expect("token"));
            } else if line.starts_with("W ") {
                in_flight = true;
            }
        }
        killed_mid_write += u32::from(in_flight);
        let token = token.expect("child reported its token");
        assert!(token > last_token, "round {round}: token {token} not above previous {last_token}");
        last_token = token;
        rt.block_on(async {
            (kit.integrity)(db.clone()).await.expect("integrity check after SIGKILL");
            let (hot, _) = (kit.open)(db.clone()).await.expect("reopen after SIGKILL");
            let object = oid("crash-obj");
            let info = hot.object_info(&object).await.expect("info").expect("object exists");
            assert!(
                info.last_seq >= max_acked,
                "round {round}: acknowledged seq {max_acked} lost (last {})",
                info.last_seq
            );
            assert!(
                info.max_token.get() >= token,
                "round {round}: the object reports token {} below the {token} granted (the grant was not stored)",
                info.max_token
            );
            let log = super::hot::changes(&*hot, &object, 0, usize::MAX).await.expect("log");
            assert_eq!(log.len() as u64, info.last_seq, "round {round}: change log has gaps");
            if at_the_grant {
                assert!(log.iter().all(|c| c.token.get() < token), "round {round}: a write under the held grant");
            }
            let mut want = Vec::with_capacity(log.len());
            let mut prev_token = crate::FencingToken::NONE;
            for (i, c) in log.iter().enumerate() {
                assert_eq!(c.seq, i as u64 + 1);
                // Writers took the object in turn, each under a larger token: never lower along
                // the log, and never above the last one handed out.
                assert!(c.token >= prev_token, "round {round}: token went down at seq {}", c.seq);
                assert!(c.token.get() <= token, "round {round}: token {} above the last issued {token}", c.token);
                prev_token = c.token;
                let text = String::from_utf8_lossy(&c.value).into_owned();
                let (seq, batch_last) = text
                    .split_once('/')
                    .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
                    .unwrap_or_else(|| panic!("round {round}: value {text:?} at seq {}", c.seq));
                assert_eq!(seq, c.seq, "round {round}: wrong value at seq {}", c.seq);
                // Batches are atomic: a record's whole batch is there.
                assert!(
                    batch_last >= seq && batch_last <= info.last_seq,
                    "round {round}: seq {seq} of a batch ending at {batch_last} is there, the log ends at {}",
                    info.last_seq
                );
                want.push(crate::Entry { key: format!("k{seq}"), value: c.value.clone(), seq });
            }
            // Every write is in the state too, exactly as logged (listed in key order).
            want.sort_by(|a, b| a.key.cmp(&b.key));
            let state = hot.list(&object, crate::KeyRange::all(), None).await.expect("list");
            assert_eq!(state, want, "round {round}: the state differs from the change log");
        });
    }
    println!(
        "crash: {kills} SIGKILLs survived ({killed_mid_write} with a write in flight, {killed_at_the_grant} right after \
         the grant), {max_acked} acknowledged writes all present, final token {last_token}"
    );
    // The kills landed inside the write path, not only between writes.
    assert!(killed_mid_write > 0, "no kill landed while a write was in flight");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> PathBuf {
    // The fencing and crash tests may start in the same microsecond in one process.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = std::env::temp_dir().join(format!("dotdo-kit-{}-{}-{n}", std::process::id(), seed()));
    std::fs::create_dir_all(&base).expect("temp dir");
    base
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn output_within_returns_everything_a_child_wrote_past_a_pipe_buffer() {
        let out = output_within(
            Command::new("sh").args(["-c", "head -c 300000 /dev/zero; echo done >&2; exit 3"]),
            Duration::from_secs(60),
            "writer",
        );
        assert_eq!(out.stdout.len(), 300_000);
        assert_eq!(out.stderr, b"done\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // measures the wall-clock wait on a real process
    fn output_within_kills_a_child_still_running_at_the_limit() {
        let started = std::time::Instant::now();
        let r = std::panic::catch_unwind(|| {
            output_within(
                Command::new("sh").args(["-c", "echo partial; exec sleep 60"]),
                Duration::from_secs(3),
                "sleeper",
            )
        });
        let msg = r.expect_err("a child past the limit fails the test");
        let msg = msg.downcast_ref::<String>().expect("message");
        assert!(msg.contains("sleeper: still running after") && msg.contains("partial"), "{msg}");
        assert!(started.elapsed() < Duration::from_secs(30), "waited {:?}", started.elapsed());
    }
}
