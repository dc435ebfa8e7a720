//! dotdo-libsql against raw libsql calls in the same run (local file, WAL, synchronous=NORMAL, one
//! file each), measured interleaved so background load affects both alike. Run through
//! `scripts/bench dotdo-libsql`; rows go to target/bench/results.json
//! (`DOTDO_BENCH_PUT_ONLY=1`: the local fenced put alone, for profiling).
//!
//! The raw baseline is what a careful user of the `libsql` crate writes: statements prepared once
//! on one kept connection and run with bound parameters (dotdo keeps a statement cache too), and
//! dotdo's WAL auto-checkpoint threshold. (dotdo's background checkpoint thread has no raw
//! counterpart: it is part of what is measured.) Every write, ours and raw,
//! stores a value unlike the key's previous one ([`Values`]): SQLite skips the page write of an
//! update that changes no byte, so rewriting one fixed value would time a raw upsert that commits
//! nothing. The same-schema baseline uses dotdo's table layouts (the state a rowid table with a
//! unique index, the change log `WITHOUT ROWID`).
//!
//! A second part runs remote mode (libsql's HTTP client) against the minimal Hrana server of the
//! tests (a local libSQL file behind loopback HTTP): not sqld's figures, but the same server for
//! both sides, so the ratio shows the round trips each side needs.

use std::time::Duration;

use dotdo_core::testkit::bench::{record, sample_pair, us, Values};
use dotdo_core::{ConsistencyGuard, HotStore, HotStoreExt, NodeId, ObjectId};
use dotdo_libsql::LibsqlStore;
use libsql::params;

#[cfg(feature = "remote")]
#[path = "../tests/support/hrana.rs"]
#[allow(dead_code)]
mod hrana;

const N: usize = 40_000;
const KEYS: usize = 10_000;

struct Raw {
    _conn: libsql::Connection,
    _db: libsql::Database,
    /// Prepared once, reused (reset around each use), as dotdo's own statement cache does.
    cache: std::collections::HashMap<&'static str, libsql::Statement>,
    i: usize,
    seq: i64,
    now: i64,
}

const UPSERT: &str = "INSERT INTO kv (k, v) VALUES (?1, ?2) ON CONFLICT (k) DO UPDATE SET v = excluded.v";
const BEGIN: &str = "BEGIN IMMEDIATE";
const COMMIT: &str = "COMMIT";
const TOKEN: &str = "SELECT max_token FROM objs WHERE do_id = ?1";
const ST_UPSERT: &str =
    "INSERT INTO st VALUES (?1, ?2, ?3, ?4) ON CONFLICT (do_id, key) DO UPDATE SET value = excluded.value, seq = excluded.seq";
const CH_APPEND: &str = "INSERT INTO ch VALUES (?1, ?2, ?3, 0, ?4, 1, 0, 'T')";
const LG_APPEND: &str = "INSERT INTO lg VALUES (?1, ?2, ?3, 0, ?4, 1, 0, 'T')";
const GET: &str = "SELECT v FROM kv WHERE k = ?1";
const ACQUIRE: &str =
    "INSERT INTO locks (do_id, node_id, acquired_at, expires_at, fencing_token) VALUES (?1, ?2, ?3, ?4, 1)
     ON CONFLICT (do_id) DO UPDATE SET node_id = excluded.node_id, acquired_at = excluded.acquired_at,
     expires_at = excluded.expires_at, fencing_token = fencing_token + 1 WHERE locks.expires_at <= ?3
     RETURNING fencing_token";
const RELEASE: &str = "UPDATE locks SET expires_at = ?2 WHERE do_id = ?1 AND fencing_token = ?3";

impl Raw {
    async fn open(path: &std::path::Path) -> Raw {
        let db = libsql::Builder::new_local(path).build().await.expect("open raw");
        let conn = db.connect().expect("connect");
        let mut rows = conn.query("PRAGMA journal_mode=WAL", ()).await.expect("wal");
        while rows.next().await.expect("row").is_some() {}
        drop(rows);
        // dotdo's WAL threshold (LibsqlSettings::wal_autocheckpoint_pages) and page cache
        // (LibsqlSettings::cache_kib) on the raw side too.
        let mut rows = conn.query("PRAGMA wal_autocheckpoint = 16384", ()).await.expect("autocheckpoint");
        while rows.next().await.expect("row").is_some() {}
        drop(rows);
        conn.execute("PRAGMA cache_size = -65536", ()).await.expect("cache_size");
        conn.execute_batch(
            "PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS locks (do_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, acquired_at INTEGER NOT NULL,
                expires_at INTEGER NOT NULL, fencing_token INTEGER NOT NULL);
             CREATE TABLE objs (do_id TEXT PRIMARY KEY, last_seq INTEGER, max_token INTEGER) WITHOUT ROWID;
             CREATE TABLE st (do_id TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, seq INTEGER NOT NULL,
                UNIQUE (do_id, key));
             CREATE TABLE ch (do_id TEXT, seq INTEGER, key TEXT, op INTEGER, value BLOB, token INTEGER, ts INTEGER,
                type TEXT, PRIMARY KEY (do_id, seq)) WITHOUT ROWID;
             CREATE TABLE lg (do_id TEXT, seq INTEGER, key TEXT, op INTEGER, value BLOB, token INTEGER, ts INTEGER,
                type TEXT, PRIMARY KEY (do_id, seq)) WITHOUT ROWID;
             INSERT INTO objs VALUES ('o', 0, 1);",
        )
        .await
        .expect("schema");
        let mut cache = std::collections::HashMap::new();
        for sql in [UPSERT, BEGIN, COMMIT, TOKEN, ST_UPSERT, CH_APPEND, LG_APPEND, GET, ACQUIRE, RELEASE] {
            cache.insert(sql, conn.prepare(sql).await.expect("prepare"));
        }
        Raw { _conn: conn, _db: db, cache, i: 0, seq: 0, now: 1_000_000 }
    }

    /// Run a prepared statement that returns no rows.
    async fn exec(&self, sql: &'static str, params: impl libsql::params::IntoParams) {
        let stmt = &self.cache[sql];
        stmt.execute(params).await.expect(sql);
        stmt.reset();
    }

    /// Run a prepared statement and return the integer of its first row's first column.
    async fn query_int(&self, sql: &'static str, params: impl libsql::params::IntoParams) -> i64 {
        let stmt = &self.cache[sql];
        let mut rows = stmt.query(params).await.expect(sql);
        let v = rows.next().await.expect("row").expect("some").get(0).expect("int");
        drop(rows);
        stmt.reset();
        v
    }

    async fn upsert(&mut self, keys: &[String], value: &[u8]) {
        self.i += 1;
        self.exec(UPSERT, params![keys[self.i % KEYS].as_str(), value.to_vec()]).await;
    }

    /// The same work as a fenced put, hand-written: read token, upsert the state, append the
    /// change, in one transaction.
    async fn same_schema_txn(&mut self, keys: &[String], value: &[u8]) {
        self.i += 1;
        self.seq += 1;
        let k = keys[self.i % KEYS].as_str();
        self.exec(BEGIN, ()).await;
        let tok = self.query_int(TOKEN, ["o"]).await;
        assert_eq!(tok, 1);
        self.exec(ST_UPSERT, params!["o", k, value.to_vec(), self.seq]).await;
        self.exec(CH_APPEND, params!["o", self.seq, k, value.to_vec()]).await;
        self.exec(COMMIT, ()).await;
    }

    /// The floor of any put that keeps a change log: one row appended to a log table alone,
    /// autocommit (no state, no token, no transaction).
    async fn log_append(&mut self, keys: &[String], value: &[u8]) {
        self.i += 1;
        self.exec(LG_APPEND, params!["o", self.i as i64, keys[self.i % KEYS].as_str(), value.to_vec()]).await;
    }

    async fn get(&mut self, keys: &[String]) {
        self.i += 1;
        let stmt = &self.cache[GET];
        let mut rows = stmt.query([keys[self.i % KEYS].as_str()]).await.expect("raw get");
        let v: Vec<u8> = rows.next().await.expect("row").expect("some").get(0).expect("blob");
        drop(rows);
        stmt.reset();
        std::hint::black_box(v);
    }

    async fn lease_pair(&mut self) {
        self.now += 10;
        let token = self.query_int(ACQUIRE, params!["obj", "node", self.now, self.now + 30_000_000]).await;
        self.exec(RELEASE, params!["obj", self.now, token]).await;
    }
}

fn main() {
    // `DOTDO_BENCH_PUT_ONLY=1` measures the local fenced put alone, `DOTDO_BENCH_GET_ONLY=1` the
    // local puts and the point get (for profiling).
    let put_only = std::env::var("DOTDO_BENCH_PUT_ONLY").is_ok_and(|o| o == "1");
    local(put_only);
    #[cfg(feature = "remote")]
    if !put_only && std::env::var("DOTDO_BENCH_GET_ONLY").is_err() {
        remote();
    }
}

#[cfg(feature = "remote")]
fn remote() {
    const M: usize = 2_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let keys: Vec<String> = (0..KEYS).map(|i| format!("key-{i:06}")).collect();
    let obj = ObjectId::new("bench-object").expect("valid");
    let node = NodeId::new("bench-node").expect("valid");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let server = hrana::HranaServer::start(&dir.path().join("primary.db"), "tok");
    let s = rt.block_on(LibsqlStore::remote(server.url(), "tok").open()).expect("open remote store");
    let raw_db = rt.block_on(libsql::Builder::new_remote(server.url(), "tok".to_string()).build()).expect("raw remote");
    let raw = raw_db.connect().expect("connect");
    rt.block_on(raw.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID", ()))
        .expect("raw schema");
    rt.block_on(raw.execute(
        "CREATE TABLE locks (do_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, acquired_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL, fencing_token INTEGER NOT NULL)",
        (),
    ))
    .expect("raw lease table");
    let lease = rt.block_on(s.acquire(&obj, &node, Duration::from_secs(3600))).expect("acquire");
    let (mut k, mut r) = (0, 0);
    let (mut ours_values, mut raw_values) = (Values::new(100), Values::new(100));
    let (ours, base) = sample_pair(
        100,
        M,
        100,
        || {
            k += 1;
            rt.block_on(s.put(&obj, lease.token, "Bench", &keys[k % KEYS], ours_values.next_value()))
                .expect("fenced put");
        },
        || {
            r += 1;
            rt.block_on(raw.execute(
                "INSERT INTO kv (k, v) VALUES (?1, ?2) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                params![keys[r % KEYS].as_str(), raw_values.next_value().to_vec()],
            ))
            .expect("raw remote upsert");
        },
    );
    record("libsql_remote/fenced_put_p50", "us", us(ours.p50()), "libsql_remote_upsert", us(base.p50()));
    record("libsql_remote/fenced_put_p99", "us", us(ours.p99()), "libsql_remote_upsert", us(base.p99()));
    let (mut g, mut h) = (0, 0);
    let get = rt.block_on(raw.prepare(GET)).expect("prepare the raw get");
    let (ours, base) = sample_pair(
        100,
        M,
        100,
        || {
            g += 1;
            std::hint::black_box(rt.block_on(s.get(&obj, &keys[g % KEYS])).expect("get"));
        },
        || {
            h += 1;
            // A statement prepared once, as ours caches its own (and as the local baseline).
            rt.block_on(async {
                let mut rows = get.query([keys[h % KEYS].as_str()]).await.expect("raw get");
                std::hint::black_box(rows.next().await.expect("row"));
                drop(rows);
                get.reset();
            })
        },
    );
    record("libsql_remote/get_p50", "us", us(ours.p50()), "libsql_remote_prepared_query", us(base.p50()));
    let other = ObjectId::new("lease-object").expect("valid");
    let mut now = 1_000_000i64;
    let (ours, base) = sample_pair(
        50,
        M / 2,
        100,
        || {
            rt.block_on(async {
                let l = s.acquire(&other, &node, Duration::from_secs(30)).await.expect("acquire");
                s.release(&l).await.expect("release");
            })
        },
        || {
            now += 10;
            // The same lease SQL as the local raw pair: an upsert returning the token, then a
            // release under it.
            rt.block_on(async {
                let mut rows =
                    raw.query(ACQUIRE, params!["obj", "node", now, now + 30_000_000]).await.expect("raw acquire");
                let token: i64 = rows.next().await.expect("row").expect("a token").get(0).expect("token");
                drop(rows);
                raw.execute(RELEASE, params!["obj", now, token]).await.expect("raw release");
            })
        },
    );
    record("libsql_remote/lease_pair_p50", "us", us(ours.p50()), "libsql_remote_lease_sql", us(base.p50()));
    drop(server);
}

fn local(put_only: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys: Vec<String> = (0..KEYS).map(|i| format!("key-{i:06}")).collect();
    let obj = ObjectId::new("bench-object").expect("valid");
    let node = NodeId::new("bench-node").expect("valid");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut raw = rt.block_on(Raw::open(&dir.path().join("raw.db")));
    let s = rt.block_on(LibsqlStore::local(dir.path().join("dotdo.db")).open()).expect("open store");
    let lease = rt.block_on(s.acquire(&obj, &node, Duration::from_secs(3600))).expect("acquire");
    let (mut ours_values, mut raw_values) = (Values::new(100), Values::new(100));
    // Pre-populate both so gets hit.
    for k in &keys {
        rt.block_on(s.put(&obj, lease.token, "Bench", k, ours_values.next_value())).expect("put");
        rt.block_on(raw.upsert(&keys, &raw_values.next_value()));
    }

    let mut k = 0;
    let mut put = || {
        k += 1;
        rt.block_on(s.put(&obj, lease.token, "Bench", &keys[k % KEYS], ours_values.next_value())).expect("fenced put");
    };
    let (ours, base) =
        sample_pair(2_000, N, 1_000, &mut put, || rt.block_on(raw.upsert(&keys, &raw_values.next_value())));
    record("libsql/fenced_put_p50", "us", us(ours.p50()), "libsql_upsert_autocommit", us(base.p50()));
    record("libsql/fenced_put_p99", "us", us(ours.p99()), "libsql_upsert_autocommit", us(base.p99()));
    record("libsql/fenced_put_throughput", "ops/s", ours.ops_per_sec(), "libsql_upsert_autocommit", base.ops_per_sec());
    let (ours, base) =
        sample_pair(2_000, N, 1_000, &mut put, || rt.block_on(raw.same_schema_txn(&keys, &raw_values.next_value())));
    record("libsql/fenced_put_p50_vs_same_schema", "us", us(ours.p50()), "libsql_same_schema_txn", us(base.p50()));
    let (ours, base) =
        sample_pair(2_000, N, 1_000, &mut put, || rt.block_on(raw.log_append(&keys, &raw_values.next_value())));
    record("libsql/fenced_put_p50_vs_log_append", "us", us(ours.p50()), "libsql_log_append_autocommit", us(base.p50()));

    if put_only {
        return;
    }
    let get_only = std::env::var("DOTDO_BENCH_GET_ONLY").is_ok_and(|o| o == "1");
    let mut g = 0;
    let (ours, base) = sample_pair(
        2_000,
        N,
        1_000,
        || {
            g += 1;
            std::hint::black_box(rt.block_on(s.get(&obj, &keys[g % KEYS])).expect("get"));
        },
        || rt.block_on(raw.get(&keys)),
    );
    record("libsql/get_p50", "us", us(ours.p50()), "libsql_point_read", us(base.p50()));
    record("libsql/get_p99", "us", us(ours.p99()), "libsql_point_read", us(base.p99()));
    if get_only {
        return;
    }

    let other = ObjectId::new("lease-object").expect("valid");
    let (ours, base) = sample_pair(
        1_000,
        N / 2,
        1_000,
        || {
            rt.block_on(async {
                let l = s.acquire(&other, &node, Duration::from_secs(30)).await.expect("acquire");
                s.release(&l).await.expect("release");
            })
        },
        || rt.block_on(raw.lease_pair()),
    );
    record("libsql/lease_pair_p50", "us", us(ours.p50()), "raw_sql_lease_pair", us(base.p50()));
    record("libsql/lease_pair_throughput", "pairs/s", ours.ops_per_sec(), "raw_sql_lease_pair", base.ops_per_sec());
}
