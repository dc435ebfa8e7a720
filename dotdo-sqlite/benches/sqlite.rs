//! dotdo-sqlite against raw rusqlite in the same run (WAL, synchronous=NORMAL, one file each).
//! Run through `scripts/bench`; rows go to target/bench/results.json.

use std::time::Duration;

use bytes::Bytes;
use dotdo_core::testkit::bench::{record, sample, us};
use dotdo_core::{ConsistencyGuard, HotStore, HotStoreExt, NodeId, ObjectId, WriteBatch};
use dotdo_sqlite::{Execution, SqliteSettings, SqliteStore};
use rusqlite::{params, Connection};

const N: usize = 50_000;
const KEYS: usize = 10_000;

fn raw_conn(path: &std::path::Path) -> Connection {
    let c = Connection::open(path).expect("open raw");
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-16384;
         CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS locks (do_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, acquired_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL, fencing_token INTEGER NOT NULL);",
    )
    .expect("schema");
    c
}

fn store(rt: &tokio::runtime::Runtime, dir: &std::path::Path, name: &str, execution: Execution) -> SqliteStore {
    let settings = SqliteSettings { execution, ..Default::default() };
    rt.block_on(SqliteStore::builder(dir.join(name)).with_settings(settings).open()).expect("open store")
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let value = Bytes::from(vec![42u8; 100]);
    let keys: Vec<String> = (0..KEYS).map(|i| format!("key-{i:06}")).collect();

    // Raw baselines.
    let raw = raw_conn(&dir.path().join("raw.db"));
    let mut i = 0;
    let raw_put = sample(5_000, N, 1, || {
        i += 1;
        raw.prepare_cached("INSERT INTO kv (k, v) VALUES (?1, ?2) ON CONFLICT (k) DO UPDATE SET v = excluded.v")
            .expect("prepare")
            .execute(params![keys[i % KEYS], &value[..]])
            .expect("raw upsert");
    });
    let raw_get = sample(5_000, N, 1, || {
        i += 1;
        let v: Vec<u8> = raw
            .prepare_cached("SELECT v FROM kv WHERE k = ?1")
            .expect("prepare")
            .query_row([&keys[i % KEYS]], |r| r.get(0))
            .expect("raw get");
        std::hint::black_box(v);
    });
    let mut now = 1_000_000i64;
    let raw_lease = sample(2_000, N / 2, 1, || {
        now += 10;
        let token: i64 = raw
            .prepare_cached(
                "INSERT INTO locks (do_id, node_id, acquired_at, expires_at, fencing_token) VALUES (?1, ?2, ?3, ?4, 1)
                 ON CONFLICT (do_id) DO UPDATE SET node_id = excluded.node_id, acquired_at = excluded.acquired_at,
                 expires_at = excluded.expires_at, fencing_token = fencing_token + 1 WHERE locks.expires_at <= ?3
                 RETURNING fencing_token",
            )
            .expect("prepare")
            .query_row(params!["obj", "node", now, now + 30_000_000], |r| r.get(0))
            .expect("raw acquire");
        raw.prepare_cached("UPDATE locks SET expires_at = ?2 WHERE do_id = ?1 AND fencing_token = ?3")
            .expect("prepare")
            .execute(params!["obj", now, token])
            .expect("raw release");
    });
    let raw_batch = sample(1, 3, 100_000, || {
        let tx = raw.unchecked_transaction().expect("tx");
        {
            let mut st = tx
                .prepare_cached("INSERT INTO kv (k, v) VALUES (?1, ?2) ON CONFLICT (k) DO UPDATE SET v = excluded.v")
                .expect("prepare");
            for j in 0..100_000 {
                st.execute(params![format!("batch-{j:06}"), &value[..]]).expect("insert");
            }
        }
        tx.commit().expect("commit");
    });

    let obj = ObjectId::new("bench-object").expect("valid");
    let node = NodeId::new("bench-node").expect("valid");
    for (label, execution, multi) in [
        ("inline", Execution::Inline, false),
        ("auto_mt", Execution::Auto, true),
        ("spawn_blocking", Execution::SpawnBlocking, true),
    ] {
        let rt = if multi {
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
        } else {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        }
        .expect("runtime");
        let s = store(&rt, dir.path(), &format!("dotdo-{label}.db"), execution);
        let lease = rt.block_on(s.acquire(&obj, &node, Duration::from_secs(3600))).expect("acquire");
        let mut k = 0;
        // Run each closure inside the runtime (block_in_place needs a worker context).
        let put = sample(5_000, N, 1, || {
            k += 1;
            rt.block_on(async { s.put(&obj, lease.token, "Bench", &keys[k % KEYS], value.clone()).await })
                .expect("fenced put");
        });
        record(
            &format!("sqlite/fenced_put_p50/{label}"),
            "us",
            us(put.p50()),
            "rusqlite_upsert_autocommit",
            us(raw_put.p50()),
        );
        record(
            &format!("sqlite/fenced_put_p99/{label}"),
            "us",
            us(put.p99()),
            "rusqlite_upsert_autocommit",
            us(raw_put.p99()),
        );
        record(
            &format!("sqlite/fenced_put_throughput/{label}"),
            "ops/s",
            put.ops_per_sec(),
            "rusqlite_upsert_autocommit",
            raw_put.ops_per_sec(),
        );
        let get = sample(5_000, N, 1, || {
            k += 1;
            std::hint::black_box(rt.block_on(async { s.get(&obj, &keys[k % KEYS]).await }).expect("get"));
        });
        record(&format!("sqlite/get_p50/{label}"), "us", us(get.p50()), "rusqlite_point_read", us(raw_get.p50()));
        let other = ObjectId::new("lease-object").expect("valid");
        let pair = sample(2_000, N / 2, 1, || {
            rt.block_on(async {
                let l = s.acquire(&other, &node, Duration::from_secs(30)).await.expect("acquire");
                s.release(&l).await.expect("release");
            });
        });
        record(
            &format!("sqlite/lease_pair_p50/{label}"),
            "us",
            us(pair.p50()),
            "raw_sql_lease_pair",
            us(raw_lease.p50()),
        );
        record(
            &format!("sqlite/lease_pair_throughput/{label}"),
            "pairs/s",
            pair.ops_per_sec(),
            "raw_sql_lease_pair",
            raw_lease.ops_per_sec(),
        );
        if label == "auto_mt" {
            let mut round = 0;
            let batch = sample(1, 3, 100_000, || {
                round += 1;
                let mut b = WriteBatch::new("Bench");
                for j in 0..100_000 {
                    b = b.put(format!("batch-{j:06}"), value.clone());
                }
                rt.block_on(async { s.write(&obj, lease.token, b).await }).expect("batch");
            });
            record(
                "sqlite/batched_put_100k",
                "rows/s",
                batch.ops_per_sec(),
                "rusqlite_one_txn_upserts",
                raw_batch.ops_per_sec(),
            );
        }
    }
}
