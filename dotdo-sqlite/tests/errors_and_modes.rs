//! Bad files, busy databases, durability and execution modes of dotdo-sqlite.

use std::time::Duration;

use dotdo_core::{Clock, ConsistencyGuard, ErrorKind, FencingToken, HotStore, HotStoreExt, NodeId, ObjectId};
use dotdo_sqlite::{Durability, Execution, SqliteSettings, SqliteStore};

fn obj() -> ObjectId {
    ObjectId::new("o1").expect("valid")
}

#[tokio::test]
async fn a_file_that_is_not_sqlite_is_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("garbage.db");
    std::fs::write(&path, b"this is not a database, it is a text file with some bytes in it ....".repeat(100))
        .expect("write");
    let e = SqliteStore::builder(&path).open().await.expect_err("garbage");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("garbage.db"), "error names the file: {e}");
}

#[tokio::test]
async fn a_damaged_database_is_reported_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    {
        let s = SqliteStore::builder(&path).open().await.expect("open");
        let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(5)).await.expect("acquire");
        for i in 0..500 {
            s.put(&obj(), l.token, "T", &format!("key-{i}"), vec![i as u8; 300].into()).await.expect("put");
        }
    }
    // Checkpoint so the data is in the main file, then scribble over its pages (not the header).
    let c = rusqlite::Connection::open(&path).expect("raw open");
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").expect("checkpoint");
    drop(c);
    let mut bytes = std::fs::read(&path).expect("read");
    assert!(bytes.len() > 16 * 4096);
    for b in bytes[4096 * 2..4096 * 12].iter_mut() {
        *b = 0xA5;
    }
    std::fs::write(&path, &bytes).expect("write");
    let outcome = async {
        let s = SqliteStore::builder(&path).open().await?;
        s.integrity_check().await?;
        s.list(&obj(), dotdo_core::KeyRange::all(), None).await.map(|_| ())
    }
    .await;
    let e = outcome.expect_err("damage must be detected");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
}

#[tokio::test]
async fn rows_that_do_not_fit_the_schema_are_corrupt_never_a_free_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let s = SqliteStore::builder(&path).open().await.expect("open");
    let n1 = NodeId::new("n1").expect("valid");
    let n2 = NodeId::new("n2").expect("valid");
    let l = s.acquire(&obj(), &n1, Duration::from_secs(60)).await.expect("acquire");
    s.put(&obj(), l.token, "T", "k", b"v".to_vec().into()).await.expect("put");
    // Another writer (or the predecessor's do_locks) left a holder that is not a valid node id.
    let c = rusqlite::Connection::open(&path).expect("raw open");
    c.execute("UPDATE do_locks SET node_id = '' WHERE do_id = ?1", [obj().as_str()]).expect("damage the lease");
    let e = s.acquire(&obj(), &n2, Duration::from_secs(60)).await.expect_err("a damaged live lease is not free");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    let e = s.current(&obj()).await.expect_err("current");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    // A sequence number that is not a number is damage too, not a panic.
    c.execute("UPDATE do_changes SET seq = 'x' WHERE do_id = ?1", [obj().as_str()]).expect("damage the log");
    let e = s.read_changes(&obj(), 0, 10).await.expect_err("read changes");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains(&path.display().to_string()), "a Corrupt error names the file: {e}");
}

/// `read_changes` returns at most `READ_CHANGES_BYTES` of values (at least one change),
/// stepping no further: a drain of a backlog of large values loaded it whole.
#[tokio::test]
async fn change_reads_are_bounded_in_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = SqliteStore::builder(dir.path().join("hot.db")).open().await.expect("open");
    let bound = dotdo_core::sql_schema::READ_CHANGES_BYTES;
    dotdo_core::testkit::hot::assert_change_reads_are_bounded_in_bytes(&s, bound).await;
}

/// A change row no dotdo writer stores (a token or sequence number out of range, an invalid key,
/// value or type) is `Corrupt` to `read_changes`, naming the database (dotdo-libsql shares the
/// list and the check).
#[tokio::test]
async fn change_rows_no_writer_makes_are_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let s = SqliteStore::builder(&path).open().await.expect("open");
    let c = rusqlite::Connection::open(&path).expect("raw open");
    let damage = |sql: &'static str, o: ObjectId| {
        c.execute(sql, [o.as_str()]).expect(sql);
        std::future::ready(())
    };
    dotdo_core::testkit::assert_damaged_change_rows_are_corrupt(&s, &path.display().to_string(), damage).await;
    // Text that is not UTF-8, a NUL, a blob where text belongs, numbers stored as text, in the
    // columns other reads return.
    dotdo_core::testkit::assert_damaged_text_is_corrupt(&s, damage).await;
}

/// Rows of an object with a live lease that do not decode make every fenced call `Corrupt`,
/// with nothing written (dotdo-libsql shares the list of damage and the check).
#[tokio::test]
async fn fenced_calls_on_rows_that_do_not_decode_are_corrupt_and_write_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let s = SqliteStore::builder(&path).open().await.expect("open");
    let c = rusqlite::Connection::open(&path).expect("raw open");
    for (i, (what, damage, written)) in dotdo_core::testkit::damaged_object_rows().enumerate() {
        let o = ObjectId::new(format!("o{i}")).expect("valid");
        let l = s.acquire(&o, &NodeId::new("n1").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
        if written {
            s.put(&o, l.token, "T", "k", b"v".to_vec().into()).await.expect("put");
        }
        c.execute(damage, [o.as_str()]).expect(&what);
        let rows = || async {
            c.query_row(dotdo_core::testkit::SQL_OBJECT_ROWS, [o.as_str()], |r| r.get::<_, String>(0)).expect("rows")
        };
        dotdo_core::testkit::assert_fenced_calls_refuse_damaged_rows(&s, &l, &what, rows).await;
    }
}

/// A live lease row whose times do not decode is `Corrupt` to `refresh`, as to `validate`, and
/// stays as it is: the refresh's SQL compared a text expiry above the time, extended the lease
/// and overwrote the damage (dotdo-libsql shares the list of damage).
#[tokio::test]
async fn a_live_lease_row_whose_times_do_not_decode_is_corrupt_to_refresh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let s = SqliteStore::builder(&path).open().await.expect("open");
    let c = rusqlite::Connection::open(&path).expect("raw open");
    for (i, (what, damage)) in dotdo_core::testkit::DAMAGED_LIVE_LEASE_TIMES.iter().enumerate() {
        let o = ObjectId::new(format!("o{i}")).expect("valid");
        let l = s.acquire(&o, &NodeId::new("n1").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
        c.execute(damage, [o.as_str()]).expect(what);
        let dump = || -> String {
            c.query_row(
                "SELECT quote(acquired_at) || ' ' || quote(expires_at) FROM do_locks WHERE do_id = ?1",
                [o.as_str()],
                |r| r.get(0),
            )
            .expect("read the row")
        };
        let before = dump();
        let e = s.refresh(&l, Duration::from_secs(60)).await.expect_err(what);
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{what}: {e}");
        assert_eq!(s.validate(&l).await.expect_err(what).kind(), &ErrorKind::Corrupt, "{what}");
        assert_eq!(dump(), before, "{what}: the damaged row was changed");
    }
}

/// An expired lease row (or token maximum) that does not decode is `Corrupt` to an acquire and
/// stays as it is (dotdo-libsql shares the list of damage).
#[tokio::test]
async fn an_expired_lease_row_that_does_not_decode_is_corrupt_never_taken_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let s = SqliteStore::builder(&path).open().await.expect("open");
    let (n1, n2) = (NodeId::new("n1").expect("valid"), NodeId::new("n2").expect("valid"));
    let c = rusqlite::Connection::open(&path).expect("raw open");
    for (i, (what, damage)) in dotdo_core::testkit::DAMAGED_EXPIRED_LEASE_ROWS.iter().enumerate() {
        let o = ObjectId::new(format!("o{i}")).expect("valid");
        let l = s.acquire(&o, &n1, Duration::from_secs(60)).await.expect("acquire");
        s.put(&o, l.token, "T", "k", b"v".to_vec().into()).await.expect("put");
        c.execute("UPDATE do_locks SET expires_at = 1 WHERE do_id = ?1", [o.as_str()]).expect("expire");
        c.execute(damage, [o.as_str()]).expect(what);
        let dump = || -> String {
            c.query_row(
                "SELECT quote(node_id) || ' ' || quote(acquired_at) || ' ' || quote(expires_at) || ' ' || \
                 quote(fencing_token) || ' ' || (SELECT quote(max_token) FROM do_objects WHERE do_id = ?1) \
                 FROM do_locks WHERE do_id = ?1",
                [o.as_str()],
                |r| r.get(0),
            )
            .expect("read the rows")
        };
        let before = dump();
        let e = s.acquire(&o, &n2, Duration::from_secs(60)).await.expect_err(what);
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{what}: {e}");
        assert_eq!(dump(), before, "{what}: the damaged row was taken over");
    }
}

/// Another application's SQLite database (user_version 0, tables of its own) is refused and
/// left untouched: dotdo used to add its tables and set user_version, which the other
/// application reads for its own migrations. A file at dotdo's version without dotdo's tables
/// (or columns) is `Corrupt`, not a `Backend` error on every call.
#[tokio::test]
async fn another_applications_database_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("app.db");
    let raw = rusqlite::Connection::open(&path).expect("raw");
    raw.execute_batch("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);").expect("app schema");
    let e = SqliteStore::builder(&path).open().await.expect_err("another application's file");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("users") && e.to_string().contains("app.db"), "{e}");
    let version: i64 = raw.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("version");
    let tables: i64 = raw
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name LIKE 'do\\_%' ESCAPE '\\'",
            [],
            |r| r.get(0),
        )
        .expect("tables");
    assert_eq!((version, tables), (0, 0), "the file was changed");
    // Not even switched to WAL (bytes 18 and 19 of the header are 1 in a rollback journal, 2
    // in WAL: the switch persists in the file).
    let header = |p: &std::path::Path| std::fs::read(p).expect("file")[18..20].to_vec();
    assert_eq!(header(&path), [1, 1], "the journal mode was changed");
    // An application with migrations of its own sets user_version too, also past dotdo's: with
    // none of dotdo's tables it is still another application's file.
    for v in [1, 2, 7] {
        raw.execute_batch(&format!("PRAGMA user_version = {v};")).expect("version");
        let e = SqliteStore::builder(&path).open().await.expect_err("another application's file");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "version {v}: {e}");
        assert!(e.to_string().contains("users") && e.to_string().contains("app.db"), "{e}");
        assert_eq!(header(&path), [1, 1], "the journal mode was changed");
    }
    // One whose virtual table needs a module this SQLite lacks (another application's
    // extension, sqlite-vec say): still another application's file, not a `Backend` error.
    let path = dir.path().join("vec.db");
    let raw = rusqlite::Connection::open(&path).expect("raw");
    raw.execute_batch(
        "CREATE TABLE items (id INTEGER PRIMARY KEY); PRAGMA writable_schema = ON; \
         INSERT INTO sqlite_master VALUES ('table', 'vectors', 'vectors', 0, 'CREATE VIRTUAL TABLE vectors USING vec0(x)'); \
         PRAGMA writable_schema = OFF;",
    )
    .expect("app schema");
    drop(raw);
    let e = SqliteStore::builder(&path).open().await.expect_err("another application's file");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("vectors") && e.to_string().contains("vec.db"), "{e}");
    // A file at dotdo's version with some of its tables only.
    let path = dir.path().join("part.db");
    let raw = rusqlite::Connection::open(&path).expect("raw");
    raw.execute_batch(
        "CREATE TABLE do_locks (do_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, acquired_at INTEGER NOT NULL, \
         expires_at INTEGER NOT NULL, fencing_token INTEGER NOT NULL); PRAGMA user_version = 2;",
    )
    .expect("part of the schema");
    let e = SqliteStore::builder(&path).open().await.expect_err("dotdo tables missing");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("do_objects") && e.to_string().contains("part.db"), "{e}");
    // A dotdo file whose lease table lost its primary key (rebuilt by hand): every acquire would
    // fail with an SQL error (its `ON CONFLICT` has no key to match), so the open refuses it.
    let path = dir.path().join("nokey.db");
    drop(SqliteStore::builder(&path).open().await.expect("create"));
    let raw = rusqlite::Connection::open(&path).expect("raw");
    raw.execute_batch(
        "DROP TABLE do_locks; CREATE TABLE do_locks (do_id TEXT NOT NULL, node_id TEXT NOT NULL, \
         acquired_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, fencing_token INTEGER NOT NULL, metadata TEXT);",
    )
    .expect("rebuilt without its key");
    let e = SqliteStore::builder(&path).open().await.expect_err("no unique key");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("do_locks") && e.to_string().contains("unique key"), "{e}");
    // The predecessor's lease table without a key on do_id (version 0): refused before anything
    // is written, the file left as it was.
    let path = dir.path().join("keyless-predecessor.db");
    let raw = rusqlite::Connection::open(&path).expect("raw");
    raw.execute_batch(
        "CREATE TABLE do_locks (do_id TEXT NOT NULL, node_id TEXT NOT NULL, acquired_at INTEGER NOT NULL, \
         expires_at INTEGER NOT NULL, fencing_token INTEGER NOT NULL);",
    )
    .expect("keyless lease table");
    let e = SqliteStore::builder(&path).open().await.expect_err("no unique key");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert_eq!(header(&path), [1, 1], "the journal mode was changed");
    let version: i64 = raw.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("version");
    assert_eq!(version, 0, "the file was claimed");
    // The predecessor's table under another case of its name is the same table: taken over.
    let path = dir.path().join("upper-predecessor.db");
    let raw = rusqlite::Connection::open(&path).expect("raw");
    raw.execute_batch(
        "CREATE TABLE DO_LOCKS (do_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, acquired_at INTEGER NOT NULL, \
         expires_at INTEGER NOT NULL, fencing_token INTEGER NOT NULL);",
    )
    .expect("upper-case lease table");
    drop(SqliteStore::builder(&path).open().await.expect("taken over"));
    // A look-alike at version 0: the predecessor's lease table name with other columns. Refused
    // (`Corrupt`) before the WAL switch: the file is left as it was (it was switched to WAL,
    // then refused).
    let path = dir.path().join("lookalike.db");
    let raw = rusqlite::Connection::open(&path).expect("raw");
    raw.execute_batch("CREATE TABLE do_locks (id INTEGER, owner TEXT);").expect("look-alike schema");
    let e = SqliteStore::builder(&path).open().await.expect_err("not dotdo's lease table");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("do_locks") && e.to_string().contains("lookalike.db"), "{e}");
    assert_eq!(header(&path), [1, 1], "the journal mode was changed");
    // A dotdo file with a table missing a column.
    let path = dir.path().join("hot.db");
    drop(SqliteStore::builder(&path).open().await.expect("create"));
    let raw = rusqlite::Connection::open(&path).expect("raw");
    raw.execute_batch("DROP TABLE do_state; CREATE TABLE do_state (do_id TEXT, key TEXT, value BLOB);")
        .expect("damage");
    let e = SqliteStore::builder(&path).open().await.expect_err("a column missing");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("do_state") && e.to_string().contains("seq"), "{e}");
    // The predecessor's lease table alone is dotdo's to take over.
    let path = dir.path().join("old.db");
    let raw = rusqlite::Connection::open(&path).expect("raw");
    raw.execute_batch(
        "CREATE TABLE do_locks (do_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, acquired_at INTEGER NOT NULL, \
         expires_at INTEGER NOT NULL, fencing_token INTEGER NOT NULL, metadata TEXT);",
    )
    .expect("predecessor schema");
    SqliteStore::builder(&path).open().await.expect("the predecessor's file opens");
    // One created without NOT NULL, with a row whose token is NULL: the file opens (the fold of
    // its lease rows failed with a constraint error, a `Backend` error on every open), and the
    // damaged row is `Corrupt` when its object is used, never a free lease.
    let path = dir.path().join("nullable.db");
    let raw = rusqlite::Connection::open(&path).expect("raw");
    raw.execute_batch(
        "CREATE TABLE do_locks (do_id TEXT PRIMARY KEY, node_id TEXT, acquired_at INTEGER, expires_at INTEGER, \
         fencing_token INTEGER, metadata TEXT); \
         INSERT INTO do_locks VALUES ('o', 'n', 0, 0, NULL, NULL), (NULL, 'n', 0, 0, 3, NULL), ('p', 'n', 0, 0, 4, NULL);",
    )
    .expect("predecessor schema");
    let s = SqliteStore::builder(&path).open().await.expect("the predecessor's file opens");
    let n = NodeId::new("n2").expect("node");
    let o = dotdo_core::ObjectId::new("o").expect("id");
    let e = s.acquire(&o, &n, Duration::from_secs(60)).await.expect_err("a damaged lease row");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    // Also a fenced write, whatever its token (one under token 1 was taken: the NULL read as 0),
    // before and after the object has a row of its own.
    let e = s.put(&o, FencingToken::new(1), "T", "k", b"v".to_vec().into()).await.expect_err("a damaged lease row");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(s.object_info(&o).await.expect("info").is_none(), "nothing written for it");
    raw.execute("INSERT INTO do_objects (do_id, last_seq, truncated_through, max_token) VALUES ('o', 0, 0, 0)", [])
        .expect("a row of its own");
    let e = s.put(&o, FencingToken::new(1), "T", "k", b"v".to_vec().into()).await.expect_err("a damaged lease row");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    let e = s.object_info(&o).await.expect_err("a damaged lease row");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    let p = dotdo_core::ObjectId::new("p").expect("id");
    let l = s.acquire(&p, &n, Duration::from_secs(60)).await.expect("another object's lease");
    assert!(l.token.get() > 4, "above the predecessor's token: {}", l.token);
}

/// A database that cannot be put in WAL mode (a VFS without shared memory) is refused: it
/// would run with a rollback journal and `synchronous=NORMAL`, which can corrupt the file on
/// power loss. Before, the open succeeded silently. It is left untouched: the WAL switch is
/// refused before the schema is written.
#[tokio::test]
async fn a_database_that_cannot_use_wal_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let uri = format!("file:{}?vfs=unix-dotfile", path.display());
    let e = SqliteStore::builder(&uri).open().await.expect_err("no WAL");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("WAL"), "{e}");
    let raw = rusqlite::Connection::open(&path).expect("raw");
    let version: i64 = raw.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("user_version");
    let tables: i64 = raw.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0)).expect("tables");
    assert_eq!((version, tables), (0, 0), "nothing of dotdo's schema was written");
}

/// A database file deleted (or replaced, as by restoring a backup) while a store has it open:
/// within a checkpoint period the store refuses every call with `Corrupt`, instead of going on
/// writing into a file no other process opens (a second store on the path had its own lease
/// table: two holders of one object).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_file_deleted_while_open_is_noticed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let settings = SqliteSettings { background_checkpoint: Some(Duration::from_millis(10)), ..Default::default() };
    let open = || SqliteStore::builder(&path).with_settings(settings.clone()).open();
    let a = open().await.expect("open");
    dotdo_core::testkit::assert_a_deleted_file_is_noticed(&path, a, || async { open().await.expect("a new file") })
        .await;
}

/// A write waiting for another process's write lock while the file is replaced (a restored
/// backup renamed over it) is refused with `Corrupt` once it gets the lock: the file was checked
/// only when the call began, and the write committed into the old file and answered `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waiting_for_the_lock_while_the_file_is_replaced_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let settings = SqliteSettings {
        background_checkpoint: Some(Duration::from_millis(10)),
        busy_timeout: Duration::from_millis(200),
        busy_retries: 20,
        ..Default::default()
    };
    let s = SqliteStore::builder(&path).with_settings(settings).open().await.expect("open");
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
    let raw = rusqlite::Connection::open(&path).expect("raw");
    raw.execute_batch("BEGIN IMMEDIATE").expect("another process holds the write lock");
    dotdo_core::testkit::assert_a_write_waiting_while_the_file_is_replaced_is_refused(&path, s, l, raw).await;
}

/// Reads needing a new connection after the database file was deleted (no background
/// checkpoint to notice) fail as the file cannot be opened (`Unavailable`) and create nothing at
/// its path (the kit's check, as dotdo-libsql).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_after_the_file_is_deleted_create_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let settings = SqliteSettings { background_checkpoint: None, ..Default::default() };
    let s = SqliteStore::builder(&path).with_settings(settings.clone()).open().await.expect("open");
    dotdo_core::testkit::assert_reads_after_the_file_is_deleted_create_nothing(&path, s, settings.read_connections)
        .await;
}

/// Settings without busy waits (no busy timeout, no retries or no backoff: a caller that
/// retries itself) write: the write budget of 0 refused every write, as over budget after 0 ns
/// of waiting for a thread, with a retryable `Unavailable` forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_without_busy_waits_still_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, settings) in [
        SqliteSettings { busy_timeout: Duration::ZERO, busy_retries: 0, ..Default::default() },
        SqliteSettings {
            busy_timeout: Duration::ZERO,
            retry_backoff: Duration::ZERO,
            busy_retries: 100,
            ..Default::default()
        },
    ]
    .into_iter()
    .enumerate()
    {
        for execution in [Execution::Inline, Execution::Auto] {
            let path = dir.path().join(format!("hot-{i}-{execution:?}.db"));
            let settings = SqliteSettings { execution, ..settings.clone() };
            let s = SqliteStore::builder(&path).with_settings(settings).open().await.expect("open");
            let l =
                s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
            for n in 0..20 {
                s.put(&obj(), l.token, "T", "k", format!("{n}").into_bytes().into()).await.expect("put");
            }
            assert_eq!(s.get(&obj(), "k").await.expect("get"), Some(b"19".to_vec().into()));
            s.refresh(&l, Duration::from_secs(60)).await.expect("refresh");
            s.release(&l).await.expect("release");
        }
    }
}

#[tokio::test]
async fn invalid_settings_are_invalid_input_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (what, settings) in [
        ("no read connections", SqliteSettings { read_connections: 0, ..Default::default() }),
        // SQLite counts the busy timeout in i32 milliseconds; rusqlite panics beyond that.
        (
            "30-day busy timeout",
            SqliteSettings { busy_timeout: Duration::from_secs(30 * 86_400), ..Default::default() },
        ),
        // Either would make a call's budget unbounded: a hang instead of `Unavailable`.
        ("4 billion busy retries", SqliteSettings { busy_retries: u32::MAX, ..Default::default() }),
        ("an endless backoff", SqliteSettings { retry_backoff: Duration::MAX, ..Default::default() }),
        // A thread checkpointing in a tight loop.
        (
            "a 1 ns checkpoint period",
            SqliteSettings { background_checkpoint: Some(Duration::from_nanos(1)), ..Default::default() },
        ),
        // Nothing would checkpoint the WAL: it would grow with every write until close.
        (
            "no checkpoints at all",
            SqliteSettings { wal_autocheckpoint_pages: 0, background_checkpoint: None, ..Default::default() },
        ),
        (
            "no checkpoints at all (zero period)",
            SqliteSettings {
                wal_autocheckpoint_pages: 0,
                background_checkpoint: Some(Duration::ZERO),
                ..Default::default()
            },
        ),
        // SQLite reads a value over i32::MAX as 0: automatic checkpoints off.
        (
            "2^31 autocheckpoint pages",
            SqliteSettings { wal_autocheckpoint_pages: 1 << 31, background_checkpoint: None, ..Default::default() },
        ),
        // Read as 0 too: the page cache silently at its minimum.
        ("a 4 TiB page cache", SqliteSettings { cache_kib: u32::MAX, ..Default::default() }),
    ] {
        for execution in [Execution::Inline, Execution::Auto] {
            let settings = SqliteSettings { execution, ..settings.clone() };
            let e = SqliteStore::builder(dir.path().join("s.db")).with_settings(settings).open().await.expect_err(what);
            assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{what}: {e}");
        }
    }
    let limit = SqliteSettings { busy_timeout: dotdo_core::sql_schema::MAX_BUSY_TIMEOUT, ..Default::default() };
    SqliteStore::builder(dir.path().join("s.db")).with_settings(limit).open().await.expect("the maximum is accepted");
    let background_only = SqliteSettings { wal_autocheckpoint_pages: 0, ..Default::default() };
    SqliteStore::builder(dir.path().join("s.db"))
        .with_settings(background_only)
        .open()
        .await
        .expect("checkpoints on the background thread only");
    // A private database has no WAL: no checkpoints at all is no reason to refuse it.
    let none = SqliteSettings { wal_autocheckpoint_pages: 0, background_checkpoint: None, ..Default::default() };
    let memory = SqliteStore::builder(":memory:").with_settings(none).open().await.expect("a private database");
    assert_eq!(
        dotdo_core::HotStore::get(&memory, &dotdo_core::ObjectId::new("o").expect("id"), "k").await.expect("get"),
        None
    );
}

/// A `file:` URI asking SQLite to create the file (`mode=rwc`) opens a working store, with and
/// without the background checkpoint thread: the readers and the checkpoint connection, which
/// must not create the file, were refused ("access mode not allowed") and every read failed.
#[tokio::test]
async fn a_uri_with_mode_rwc_opens_a_working_store() {
    use dotdo_core::{ConsistencyGuard, HotStoreExt, NodeId, ObjectId};
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, background) in [("a.db", Some(Duration::from_millis(10))), ("b.db", None)] {
        let uri = format!("file:{}?mode=rwc", dir.path().join(name).display());
        let settings = SqliteSettings { background_checkpoint: background, ..Default::default() };
        let store = SqliteStore::builder(&uri).with_settings(settings).open().await.expect(name);
        let o = ObjectId::new("o1").expect("id");
        let l = store.acquire(&o, &NodeId::new("n1").expect("id"), Duration::from_secs(10)).await.expect("acquire");
        store.put(&o, l.token, "T", "k", "v".into()).await.expect("put");
        assert_eq!(store.get(&o, "k").await.expect("a read on a reader connection").as_deref(), Some(&b"v"[..]));
        assert_eq!(store.current(&o).await.expect("current"), Some(l));
        assert!(dir.path().join(name).exists(), "{name}: the file is where the URI says");
    }
}

/// A dotdo file SQLite can only open read-only (here `mode=ro`; its permissions or a read-only
/// mount alike) is refused at open: it is already in WAL mode, so nothing at open writes, and
/// the store opened, every write then failing.
#[tokio::test]
async fn a_file_that_opens_read_only_is_refused_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    drop(SqliteStore::builder(&path).open().await.expect("create"));
    let uri = format!("file:{}?mode=ro", path.display());
    let e = SqliteStore::builder(&uri).open().await.expect_err("read-only");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(!e.is_retryable(), "{e}");
    assert!(e.to_string().contains("cannot be written") && e.to_string().contains("hot.db"), "{e}");
}

#[tokio::test]
async fn an_unopenable_path_is_unavailable() {
    let e = SqliteStore::builder("/nonexistent-dir/for/sure/hot.db").open().await.expect_err("no dir");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_gives_unavailable_after_bounded_retries_then_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let settings = SqliteSettings {
        busy_timeout: Duration::from_millis(20),
        busy_retries: 2,
        retry_backoff: Duration::from_millis(5),
        ..Default::default()
    };
    let s = SqliteStore::builder(&path).with_settings(settings).open().await.expect("open");
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(30)).await.expect("acquire");
    let blocker = rusqlite::Connection::open(&path).expect("raw");
    blocker.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    let e = s.put(&obj(), l.token, "T", "k", "v".into()).await.expect_err("locked");
    assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
    assert!(e.to_string().contains(&path.display().to_string()), "names the database: {e}");
    blocker.execute_batch("ROLLBACK").expect("unlock");
    s.put(&obj(), l.token, "T", "k", "v".into()).await.expect("works once unlocked");
    assert_eq!(s.get(&obj(), "k").await.expect("get").as_deref(), Some(&b"v"[..]));
}

/// A write call that waited longer than its write budget for a blocking thread fails with
/// `Unavailable` right away, without then spending a whole budget on busy retries (it took the
/// free connection and retried another process's lock for a further budget: the documented
/// bound of twice the budget in all did not hold).
#[test]
#[allow(clippy::disallowed_methods)] // real time: a blocking thread held on purpose
fn a_write_that_waited_its_budget_for_a_thread_fails_without_retrying() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hot.db");
        // A budget of 1000 + 1000 + 1 = 2001 ms.
        let settings = SqliteSettings {
            busy_timeout: Duration::from_secs(1),
            busy_retries: 1,
            retry_backoff: Duration::from_millis(1),
            execution: Execution::SpawnBlocking,
            ..Default::default()
        };
        let s = SqliteStore::builder(&path).with_settings(settings).open().await.expect("open");
        let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
        let blocker = rusqlite::Connection::open(&path).expect("raw");
        blocker.execute_batch("BEGIN EXCLUSIVE").expect("lock");
        // The only blocking thread is busy for 3 s, over the 2 s budget.
        let busy = tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_secs(3)));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = std::time::Instant::now();
        let e = s.put(&obj(), l.token, "T", "k", "v".into()).await.expect_err("locked, and waited past its budget");
        let took = started.elapsed();
        assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains("blocking thread"), "{e}");
        // About 3 s for the thread; retrying the lock would add the whole 2 s budget.
        assert!(
            took < Duration::from_millis(4200),
            "the call waited about 3 s for a thread, then {:?} more (its busy retries take 2 s): {e}",
            took.saturating_sub(Duration::from_millis(2980))
        );
        busy.await.expect("busy thread");
        blocker.execute_batch("ROLLBACK").expect("unlock");
        s.put(&obj(), l.token, "T", "k", "v".into()).await.expect("works once a thread and the lock are free");
    });
}

/// A call on a tokio runtime that is shutting down (its blocking pool refuses new work) is
/// `Shutdown`: nothing ran (it was a non-retryable `Backend`, "report a bug").
#[test]
fn a_call_on_a_runtime_shutting_down_is_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let settings = SqliteSettings { execution: Execution::SpawnBlocking, ..Default::default() };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (s, l) = rt.block_on(async {
        let s = SqliteStore::builder(&path).with_settings(settings).open().await.expect("open");
        let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
        (s, l)
    });
    let handle = rt.handle().clone();
    rt.shutdown_background();
    let entered = handle.enter();
    let e = futures::executor::block_on(s.put(&obj(), l.token, "T", "k", "v".into())).expect_err("shut down");
    assert_eq!(e.kind(), &ErrorKind::Shutdown, "{e}");
    drop(entered);
    // Nothing was written: the file holds no change.
    let raw = rusqlite::Connection::open(&path).expect("raw");
    let n: i64 = raw.query_row("SELECT count(*) FROM do_changes", [], |r| r.get(0)).expect("count");
    assert_eq!(n, 0);
}

/// A change-log row whose object id is not valid makes `objects_with_pending_changes` `Corrupt`
/// naming the database file, as every other `Corrupt` of the store does.
#[tokio::test]
async fn an_invalid_object_id_in_the_change_log_is_corrupt_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let s = SqliteStore::builder(&path).open().await.expect("open");
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
    s.put(&obj(), l.token, "T", "k", "v".into()).await.expect("put");
    let raw = rusqlite::Connection::open(&path).expect("raw");
    raw.execute("UPDATE do_changes SET do_id = 'bad id!'", []).expect("damage");
    let e = s.objects_with_pending_changes(None, 10).await.expect_err("damaged");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains(&path.display().to_string()), "names the file: {e}");
}

#[tokio::test]
async fn full_durability_persists_across_reopen_and_tokens_keep_rising() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let settings = SqliteSettings { durability: Durability::Full, ..Default::default() };
    let node = NodeId::new("n").expect("valid");
    let first = {
        let s = SqliteStore::builder(&path).with_settings(settings.clone()).open().await.expect("open");
        let l = s.acquire(&obj(), &node, Duration::from_millis(1)).await.expect("acquire");
        s.put(&obj(), l.token, "T", "k", "v".into()).await.expect("put");
        l.token
    };
    std::thread::sleep(Duration::from_millis(2));
    let s = SqliteStore::builder(&path).with_settings(settings).open().await.expect("reopen");
    assert_eq!(s.get(&obj(), "k").await.expect("get").as_deref(), Some(&b"v"[..]));
    let l = s.acquire(&obj(), &node, Duration::from_secs(1)).await.expect("acquire again");
    assert!(l.token > first);
}

fn modes_roundtrip(execution: Execution) {
    let run = async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = SqliteSettings { execution, ..Default::default() };
        let s = SqliteStore::builder(dir.path().join("hot.db")).with_settings(settings).open().await.expect("open");
        let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(5)).await.expect("acquire");
        s.put(&obj(), l.token, "T", "k", "v".into()).await.expect("put");
        assert_eq!(s.get(&obj(), "k").await.expect("get").as_deref(), Some(&b"v"[..]));
    };
    match execution {
        Execution::Inline => futures::executor::block_on(run),
        Execution::SpawnBlocking => {
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt").block_on(run)
        }
        Execution::Auto => {
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt").block_on(run);
        }
        other => panic!("no test for execution mode {other:?}"),
    }
}

#[test]
fn every_execution_mode_works_in_its_setting() {
    modes_roundtrip(Execution::Inline);
    modes_roundtrip(Execution::SpawnBlocking);
    modes_roundtrip(Execution::Auto);
    // Auto outside any runtime runs inline.
    futures::executor::block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::builder(dir.path().join("hot.db")).open().await.expect("open outside tokio");
        assert_eq!(s.get(&obj(), "k").await.expect("get"), None);
    });
}

/// `Execution::SpawnBlocking` needs tokio's blocking pool: outside a tokio runtime it is a clear
/// `InvalidInput`, not a panic.
#[test]
fn spawn_blocking_outside_tokio_is_invalid_input_not_a_panic() {
    futures::executor::block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = SqliteSettings { execution: Execution::SpawnBlocking, ..Default::default() };
        let e = match SqliteStore::builder(dir.path().join("hot.db")).with_settings(settings).open().await {
            Ok(s) => s.get(&obj(), "k").await.expect_err("outside tokio"),
            Err(e) => e,
        };
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("SpawnBlocking"), "{e}");
    });
}

/// A relative path is resolved once, at open: read connections (opened lazily) reach the
/// writer's file even if the working directory changes later.
#[tokio::test]
async fn a_relative_path_is_made_absolute_at_open() {
    let dir = tempfile::tempdir_in(".").expect("tempdir under the working directory");
    let name = dir.path().file_name().expect("name").to_owned();
    let relative = std::path::Path::new(&name).join("hot.db");
    assert!(relative.is_relative());
    let s = SqliteStore::builder(&relative).open().await.expect("open");
    assert!(s.path().is_absolute(), "{}", s.path().display());
    assert_eq!(s.path(), std::env::current_dir().expect("cwd").join(&relative));
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
    s.put(&obj(), l.token, "T", "k", b"v".to_vec().into()).await.expect("put");
    // A second store on the same absolute path reads it (its read connections open that file).
    let again = SqliteStore::builder(s.path()).open().await.expect("reopen by the absolute path");
    assert_eq!(again.get(&obj(), "k").await.expect("get").as_deref(), Some(&b"v"[..]));
    assert_eq!(s.get(&obj(), "k").await.expect("get").as_deref(), Some(&b"v"[..]));
}

/// On a multi-thread runtime with ONE worker, a put that waits for SQLite's write lock (held by
/// another connection) does not stall the worker: other tasks keep running meanwhile. A put
/// that blocked the worker thread itself would freeze the ticker until the lock was released.
/// A put waiting for the write lock another connection holds does not stall the (only) worker:
/// other tasks keep running (a put forced inline fails this with 0 ticks in 300 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn auto_mode_does_not_stall_other_tasks_on_a_multi_thread_runtime() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let settings = SqliteSettings { busy_timeout: Duration::from_secs(5), ..Default::default() };
    let s = SqliteStore::builder(&path).with_settings(settings).open().await.expect("open");
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(30)).await.expect("acquire");
    let raw = rusqlite::Connection::open(&path).expect("raw");
    raw.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
    let put = async move { s.put(&obj(), l.token, "T", "k", "v".into()).await };
    let release = async { raw.execute_batch("COMMIT").expect("release the lock") };
    dotdo_core::testkit::assert_waiting_call_does_not_stall(put, release).await.expect("the put goes through");
}

/// With background checkpoints the database file receives the committed pages without any
/// commit crossing the inline threshold; without them the pages stay in the WAL. Dropping the
/// store stops the thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_checkpoints_copy_the_wal_into_the_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut db_sizes = Vec::new();
    for background in [None, Some(Duration::from_millis(10))] {
        let path = dir.path().join(format!("hot-{}.db", background.is_some()));
        let settings = SqliteSettings {
            background_checkpoint: background,
            wal_autocheckpoint_pages: 1_000_000,
            ..Default::default()
        };
        let s = SqliteStore::builder(&path).with_settings(settings).open().await.expect("open");
        let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
        let empty = std::fs::metadata(&path).expect("db").len();
        for i in 0..200 {
            s.put(&obj(), l.token, "T", &format!("k{i}"), vec![7u8; 1000].into()).await.expect("put");
        }
        // Real time: the checkpoint thread runs on its own. Without it, 300 ms show that
        // nothing moves; with it, wait (up to 10 s on a loaded machine) for the pages to arrive.
        let waited = dotdo_core::SystemClock::new();
        let start = waited.monotonic();
        loop {
            #[allow(clippy::disallowed_methods)]
            tokio::time::sleep(Duration::from_millis(if background.is_some() { 10 } else { 300 })).await;
            let size = std::fs::metadata(&path).expect("db").len();
            if background.is_none()
                || size > empty + 200 * 1000
                || waited.monotonic().saturating_sub(start) > Duration::from_secs(10)
            {
                break;
            }
        }
        db_sizes.push((empty, std::fs::metadata(&path).expect("db").len()));
        drop(s);
    }
    let (empty, without) = db_sizes[0];
    let (_, with) = db_sizes[1];
    assert_eq!(without, empty, "no checkpoint ran: the pages are still in the WAL");
    assert!(with > empty + 200 * 1000, "background checkpoints copied the pages: {db_sizes:?}");
}

/// A file that already has the predecessor's `do_locks` (seed 002) with issued tokens: opening
/// it folds those tokens into dotdo's fencing state, so a write with a lower token is fenced and
/// the next lease gets a larger token.
#[tokio::test]
async fn lease_tokens_of_a_predecessor_do_locks_table_fence_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("legacy.db");
    {
        let c = rusqlite::Connection::open(&path).expect("raw open");
        c.execute_batch(
            "CREATE TABLE do_locks (do_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, acquired_at INTEGER NOT NULL,
                expires_at INTEGER NOT NULL, fencing_token INTEGER NOT NULL, metadata TEXT);
             INSERT INTO do_locks VALUES ('user:a', 'old-node', 0, 1, 7, NULL);",
        )
        .expect("predecessor schema");
    }
    let s = SqliteStore::builder(&path).open().await.expect("open");
    let a = ObjectId::new("user:a").expect("id");
    let e = s.put(&a, dotdo_core::FencingToken::new(3), "T", "k", b"v".to_vec().into()).await.expect_err("stale");
    assert!(matches!(e.kind(), ErrorKind::Fenced { .. }), "{e}");
    let l = s.acquire(&a, &NodeId::new("n").expect("valid"), Duration::from_secs(5)).await.expect("acquire");
    assert_eq!(l.token.get(), 8);
    s.put(&a, l.token, "T", "k", b"v".to_vec().into()).await.expect("current token");
}

/// A store on spawned blocking threads with a short busy budget (3 attempts of 150 ms plus 10 +
/// 20 ms of backoff: 480 ms), its lease on `obj()`, and a raw connection holding the file's
/// write lock as another process would.
async fn locked_store(dir: &std::path::Path) -> (SqliteStore, dotdo_core::Lease, rusqlite::Connection) {
    let path = dir.join("hot.db");
    let settings = SqliteSettings {
        busy_timeout: Duration::from_millis(150),
        busy_retries: 2,
        retry_backoff: Duration::from_millis(10),
        execution: Execution::SpawnBlocking,
        ..Default::default()
    };
    let s = SqliteStore::builder(&path).with_settings(settings).open().await.expect("open");
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
    let raw = rusqlite::Connection::open(&path).expect("raw");
    raw.execute_batch("BEGIN EXCLUSIVE").expect("another process holds the write lock");
    (s, l, raw)
}

/// Eight writers of one store queued behind another process's write lock each get a retryable
/// `Unavailable` within their own busy budget (plus scheduling), not the last one after eight
/// budgets: waiting for the store's write connection counts against the same budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_writers_behind_a_foreign_lock_each_fail_in_bounded_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, l, raw) = locked_store(dir.path()).await;
    // One budget: 3 attempts of 150 ms plus 10 + 20 ms of backoff = 480 ms. Without the bound the
    // last of eight queued writers took about 4 s.
    let hot: std::sync::Arc<dyn HotStore> = std::sync::Arc::new(s.clone());
    dotdo_core::testkit::assert_queued_writers_fail_in_bounded_time(hot, &obj(), l.token, Duration::from_millis(480))
        .await;
    raw.execute_batch("ROLLBACK").expect("release");
    s.put(&obj(), l.token, "T", "k", "v".into()).await.expect("writes go through again");
}

/// A call whose caller gives up (a timeout around it) while its work waits on a blocking thread
/// does not commit afterwards: here an acquire queued behind another process's write lock, which
/// is released right after the caller's timeout. Before, the acquire went on and took the lease
/// with nobody to use it, and the caller's retry got `LeaseHeld` naming itself for a TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // real time: the store's work runs on real time
async fn work_whose_caller_gave_up_does_not_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, _l, raw) = locked_store(dir.path()).await;
    let other = ObjectId::new("other").expect("valid");
    let n = NodeId::new("n").expect("valid");
    tokio::time::timeout(Duration::from_millis(50), s.acquire(&other, &n, Duration::from_secs(60)))
        .await
        .expect_err("the caller gives up while the acquire waits for the lock");
    raw.execute_batch("ROLLBACK").expect("the other process lets go");
    // Longer than the acquire's whole budget (480 ms): it would have run by now.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(s.current(&other).await.expect("current"), None, "no lease taken for a caller that left");
    s.acquire(&other, &n, Duration::from_secs(60)).await.expect("the caller's retry");
}

/// With more writers than blocking threads (a current-thread runtime whose blocking pool has two
/// threads), the time a call waits for a thread counts against its write budget: ten writers
/// behind another process's lock all fail within about two budgets. Before, each pair of
/// writers waited its own budget after the pair before it (five budgets for the last pair).
#[test]
#[allow(clippy::disallowed_methods)]
fn time_waiting_for_a_blocking_thread_counts_against_the_write_budget() {
    let rt =
        tokio::runtime::Builder::new_current_thread().max_blocking_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, l, raw) = locked_store(dir.path()).await;
        // One budget: 3 attempts of 150 ms plus 10 + 20 ms of backoff = 480 ms.
        let budget = Duration::from_millis(480);
        let started = std::time::Instant::now();
        let calls: Vec<_> = (0..10)
            .map(|i| {
                let (s, token) = (s.clone(), l.token);
                tokio::spawn(async move { s.put(&obj(), token, "T", &format!("k{i}"), "v".into()).await })
            })
            .collect();
        let mut cycles = 0;
        for c in calls {
            let e = c.await.expect("join").expect_err("the database is locked");
            assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
            cycles += usize::from(e.to_string().contains("after 2 retries"));
        }
        // Each call: its wait for a thread and the store's connection within one budget, its
        // busy retries within another. Without counting the thread wait: about five budgets,
        // each pair of writers running its busy retries after the pair before it (5 to 10 full
        // busy cycles); counting it, the writers after the first pair find their budget spent
        // and fail at once (at most the first two or three run a cycle: one for the first
        // thread's writer, one for whichever writer got the connection next). Judged by the
        // cycles run, not by time alone (a loaded machine stretches each cycle's sleeps).
        let took = started.elapsed();
        assert!(cycles <= 3, "{cycles} writers ran a full busy cycle, in {took:?}");
        assert!(took < budget * 6, "ten writers on two threads took {took:?}");
        raw.execute_batch("ROLLBACK").expect("release");
        s.put(&obj(), l.token, "T", "k", "v".into()).await.expect("writes go through again");
    });
}

/// The schema text both SQL backends run to upgrade a file marks the written objects without
/// live keys of a file below version 3, and nothing at version 3 (dotdo-libsql runs the text
/// again when its upgrade program follows another process's upgrade of the file; marking then
/// would mark objects emptied since).
#[test]
fn the_upgrade_marks_evictions_only_below_version_3() {
    let c = rusqlite::Connection::open_in_memory().expect("open");
    c.execute_batch(dotdo_core::sql_schema::SQL_HOT_SCHEMA).expect("a new file's schema");
    c.execute_batch(
        "INSERT INTO do_objects VALUES ('emptied', 5, 5, 1), ('leased', 0, 0, 1), ('live', 3, 3, 1), ('pending', 0, 0, 1); \
         INSERT INTO do_state VALUES ('live', 'k', x'00', 3); \
         INSERT INTO do_changes VALUES ('pending', 1, 'k', 1, x'', 1, 0, 'T');",
    )
    .expect("rows");
    let marked = |c: &rusqlite::Connection| -> Vec<String> {
        let mut stmt = c.prepare("SELECT do_id FROM do_evicted ORDER BY do_id").expect("prepare");
        stmt.query_map([], |r| r.get(0)).expect("query").collect::<rusqlite::Result<_>>().expect("rows")
    };
    c.execute_batch(&format!("PRAGMA user_version = 3; {}", dotdo_core::sql_schema::SQL_HOT_SCHEMA)).expect("again");
    assert!(marked(&c).is_empty(), "at version 3 the text marks nothing: {:?}", marked(&c));
    c.execute_batch(&format!("PRAGMA user_version = 2; {}", dotdo_core::sql_schema::SQL_HOT_SCHEMA)).expect("upgrade");
    assert_eq!(marked(&c), ["emptied", "pending"], "written, without live keys (never written: not marked)");
}

/// Schema versions: a file of version 1 or 2 is upgraded in place (to 3) and keeps its state and
/// its lease; objects ever written and without live keys in a file from before version 3
/// (evicted or emptied, it did not record which) are marked evicted, so they are restored from
/// cold as before (not objects never written: nothing to restore); a file of a newer version
/// than this library's is refused with `Corrupt` and left alone.
#[tokio::test]
async fn older_schema_versions_upgrade_and_newer_ones_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let version = |p: &std::path::Path| -> i64 {
        let c = rusqlite::Connection::open(p).expect("raw open");
        c.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("user_version")
    };
    let set_version = |p: &std::path::Path, v: i64| {
        let c = rusqlite::Connection::open(p).expect("raw open");
        c.execute_batch(&format!("PRAGMA user_version = {v}")).expect("set user_version");
    };
    let lease = {
        let s = SqliteStore::builder(&path).open().await.expect("open");
        let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(600)).await.expect("acquire");
        s.put(&obj(), l.token, "T", "k", b"v".to_vec().into()).await.expect("put");
        l
    };
    assert_eq!(version(&path), 3);
    // A version-2 file (no `do_evicted`) with an object whose live state is gone (evicted, or
    // its keys deleted: version 2 cannot tell).
    let (gone, leased) = (ObjectId::new("gone").expect("valid"), ObjectId::new("leased").expect("valid"));
    let g = {
        let s = SqliteStore::builder(&path).open().await.expect("open");
        let g = s.acquire(&gone, &NodeId::new("n").expect("valid"), Duration::from_secs(600)).await.expect("acquire");
        s.put(&gone, g.token, "T", "k", b"v".to_vec().into()).await.expect("put");
        s.delete(&gone, g.token, "T", "k").await.expect("delete");
        s.truncate_changes(&gone, g.token, 2).await.expect("truncate");
        assert!(s.object_info(&gone).await.expect("info").expect("object").resident, "emptied here");
        // Leased, never written: nothing to restore, so not marked by the upgrade.
        s.acquire(&leased, &NodeId::new("n").expect("valid"), Duration::from_secs(600)).await.expect("acquire");
        g
    };
    {
        let c = rusqlite::Connection::open(&path).expect("raw open");
        c.execute_batch("DROP TABLE do_evicted; PRAGMA user_version = 2;").expect("make it a version-2 file");
    }
    {
        let s = SqliteStore::builder(&path).open().await.expect("open a version-2 file");
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
    assert_eq!(version(&path), 3, "upgraded in place");
    set_version(&path, 1);
    {
        let s = SqliteStore::builder(&path).open().await.expect("open a version-1 file");
        assert_eq!(s.get(&obj(), "k").await.expect("get"), Some(b"v".to_vec().into()));
        s.validate(&lease).await.expect("the lease survives the upgrade");
        s.put(&obj(), lease.token, "T", "k2", b"w".to_vec().into()).await.expect("its token still writes");
        let e = s.acquire(&obj(), &NodeId::new("m").expect("valid"), Duration::from_secs(5)).await.expect_err("held");
        assert!(matches!(e.kind(), ErrorKind::LeaseHeld { .. }), "{e}");
    }
    assert_eq!(version(&path), 3, "upgraded in place");
    {
        let s = SqliteStore::builder(&path).open().await.expect("open");
        let info = s.object_info(&gone).await.expect("info").expect("object");
        assert!(!info.resident, "a file from before version 3 again: marked, restored from cold: {info:?}");
    }
    set_version(&path, 4);
    let e = SqliteStore::builder(&path).open().await.expect_err("a newer file");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("schema version 4"), "{e}");
    assert_eq!(version(&path), 4, "a refused file is left alone");

    // The version is decided under the write lock: a version-1 file that another process
    // upgrades to a newer version while this one waits for the lock is refused, not
    // downgraded.
    set_version(&path, 1);
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let upgrader = {
        let path = path.clone();
        std::thread::spawn(move || {
            let c = rusqlite::Connection::open(&path).expect("raw open");
            c.execute_batch("BEGIN IMMEDIATE; PRAGMA user_version = 4;").expect("lock");
            locked_tx.send(()).expect("signal");
            #[allow(clippy::disallowed_methods)] // the other process holds its lock for a while
            std::thread::sleep(Duration::from_millis(300));
            c.execute_batch("COMMIT").expect("commit");
        })
    };
    locked_rx.recv().expect("locked");
    let e = SqliteStore::builder(&path).open().await.expect_err("upgraded to a newer version meanwhile");
    upgrader.join().expect("upgrader");
    assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    assert_eq!(version(&path), 4, "not downgraded");
}

/// `:memory:` (and the empty path's temporary database) is private to one connection: the
/// store serves reads from its write connection, so what it writes it reads.
#[tokio::test]
async fn an_in_memory_database_reads_what_it_writes() {
    for path in [":memory:", ""] {
        let s = SqliteStore::builder(path).open().await.expect("open");
        let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
        s.put(&obj(), l.token, "T", "k", b"v".to_vec().into()).await.expect("put");
        assert_eq!(s.get(&obj(), "k").await.expect("get"), Some(b"v".to_vec().into()), "{path:?}");
        assert_eq!(s.current(&obj()).await.expect("current"), Some(l.clone()));
        assert_eq!(s.read_changes(&obj(), 0, 10).await.expect("log").len(), 1);
        s.integrity_check().await.expect("integrity");
    }
}

/// `Execution::Auto` (the default) inside a `LocalSet` on a multi-threaded runtime, where tokio
/// refuses `block_in_place` on the `block_on` thread: calls fall back to the blocking pool
/// instead of panicking.
#[test]
fn auto_execution_in_a_local_set_is_not_a_panic() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(tokio::task::LocalSet::new().run_until(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::builder(dir.path().join("h.db")).open().await.expect("open in a LocalSet");
        let o = dotdo_core::ObjectId::new("o").expect("id");
        let l = s
            .acquire(&o, &dotdo_core::NodeId::new("n").expect("node"), std::time::Duration::from_secs(5))
            .await
            .expect("acquire");
        s.put(&o, l.token, "T", "k", bytes::Bytes::from_static(b"v")).await.expect("put");
        assert_eq!(s.get(&o, "k").await.expect("get"), Some(bytes::Bytes::from_static(b"v")));
    }));
}

/// `file:` with an empty path is SQLite's private temporary database: kept on one connection
/// like `:memory:` (readers opening it each got an empty database of their own); a path with a
/// NUL byte is `InvalidInput`.
#[tokio::test]
async fn an_empty_file_uri_is_a_private_database_and_a_nul_path_is_refused() {
    for uri in ["file:", "file:?cache=private"] {
        let s = SqliteStore::builder(uri).open().await.expect("open");
        let l = s.acquire(&obj(), &NodeId::new("n").expect("node"), Duration::from_secs(5)).await.expect("acquire");
        s.put(&obj(), l.token, "T", "k", bytes::Bytes::from_static(b"v")).await.expect("put");
        assert_eq!(s.get(&obj(), "k").await.expect("get"), Some(bytes::Bytes::from_static(b"v")), "{uri}");
    }
    let e = SqliteStore::builder("hot\0.db").open().await.expect_err("NUL");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
}

/// A read of an in-memory database (one connection, shared with writes) waits for a write in
/// progress only within the store's write budget, then gets a retryable `Unavailable`: it used
/// to wait for the connection without bound. (Reads go on every few milliseconds while a large
/// write runs: those that land while it holds the connection are refused in bounded time.)
#[test]
#[allow(clippy::disallowed_methods)] // real time: the read's wait is what is measured
fn an_in_memory_read_behind_a_long_write_is_unavailable_in_bounded_time() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let settings = SqliteSettings {
        busy_timeout: Duration::from_millis(10),
        busy_retries: 0,
        execution: Execution::SpawnBlocking,
        ..Default::default()
    };
    let s = rt.block_on(SqliteStore::builder(":memory:").with_settings(settings).open()).expect("open");
    let l =
        rt.block_on(s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(600))).expect("acquire");
    let mut b = dotdo_core::WriteBatch::new("T");
    for j in 0..200_000 {
        b = b.put(format!("k{j:06}"), vec![1u8; 64]);
    }
    let writing = {
        let (s, token) = (s.clone(), l.token);
        rt.spawn(async move { s.write(&obj(), token, b).await })
    };
    let (mut refused, mut longest) = (0, Duration::ZERO);
    while !writing.is_finished() {
        let started = std::time::Instant::now();
        let read = rt.block_on(s.get(&obj(), "k000000"));
        longest = longest.max(started.elapsed());
        if let Err(e) = read {
            assert_eq!(e.kind(), &ErrorKind::Unavailable, "{e}");
            assert!(e.is_retryable(), "{e}");
            refused += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    rt.block_on(writing).expect("join").expect("the long write");
    assert!(refused > 0, "no read was refused while the write held the connection (longest wait {longest:?})");
    // (Each read waits about 10 ms at most; the bound leaves room for a loaded machine.)
    assert!(longest < Duration::from_secs(1), "a read waited {longest:?}");
    assert!(rt.block_on(s.get(&obj(), "k000000")).expect("after the write").is_some());
}

/// A write that waits out another connection's lock (its attempts retried) records the time of
/// the attempt that commits, not the time it was called: read before the wait, a change
/// committed after another carried an earlier time than it (here 10 s earlier).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_waited_for_a_lock_is_stamped_when_it_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let clock = std::sync::Arc::new(dotdo_core::ManualClock::new(dotdo_core::testkit::KIT_EPOCH));
    let settings = SqliteSettings {
        busy_timeout: Duration::from_millis(20),
        busy_retries: 40,
        retry_backoff: Duration::from_millis(5),
        ..Default::default()
    };
    let s = SqliteStore::builder(&path).with_settings(settings).with_clock(clock.clone()).open().await.expect("open");
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
    let blocker = rusqlite::Connection::open(&path).expect("raw");
    blocker.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    let unlock = async move { blocker.execute_batch("ROLLBACK").expect("unlock") };
    dotdo_core::testkit::assert_a_write_waiting_for_a_lock_is_stamped_when_it_commits(s, l, &clock, unlock).await;
}

/// A `file:` URI in SQLite's shared-cache mode is refused at open: its connections share one
/// page cache with table locks, so reads during a write failed with `SQLITE_LOCKED` (no busy
/// timeout waits that out) and answered `Unavailable`.
#[tokio::test]
async fn a_shared_cache_uri_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = format!("file:{}?cache=shared", dir.path().join("hot.db").display());
    let e = SqliteStore::builder(&uri).open().await.expect_err("shared cache");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("cache=shared"), "{e}");
    // The same file without the parameter opens.
    let plain = format!("file:{}", dir.path().join("hot.db").display());
    SqliteStore::builder(&plain).open().await.expect("opens without it");
}

/// A write whose clock panics inside its transaction leaves no transaction open: another
/// process's writer gets the database's write lock at once (it waited for this store's next
/// write, which never came).
#[tokio::test]
async fn a_panicking_clock_inside_a_write_leaves_the_database_unlocked() {
    use dotdo_core::testkit::PanickingClock;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hot.db");
    let clock = std::sync::Arc::new(PanickingClock::new(dotdo_core::ManualClock::new(dotdo_core::testkit::KIT_EPOCH)));
    let settings = SqliteSettings { execution: Execution::SpawnBlocking, ..Default::default() };
    let s = SqliteStore::builder(&path).with_settings(settings).with_clock(clock.clone()).open().await.expect("open");
    let l = s.acquire(&obj(), &NodeId::new("n").expect("valid"), Duration::from_secs(60)).await.expect("acquire");
    clock.set_panicking(true);
    let e = s.put(&obj(), l.token, "T", "k", "v".into()).await.expect_err("the clock panicked");
    assert!(e.to_string().contains("sqlite task failed"), "{e}");
    let other = rusqlite::Connection::open(&path).expect("raw");
    other.busy_timeout(Duration::from_millis(200)).expect("busy timeout");
    other.execute_batch("BEGIN IMMEDIATE; ROLLBACK").expect("the write lock is free");
    clock.set_panicking(false);
    s.put(&obj(), l.token, "T", "k", "v2".into()).await.expect("the store writes on");
    assert_eq!(s.get(&obj(), "k").await.expect("get").expect("value").as_ref(), b"v2");
}
