//! The SQL schema the SQLite-family hot stores share (dotdo-sqlite on rusqlite, dotdo-libsql on
//! libSQL): one text, so a database file written by one backend is read by the other. The lease
//! table follows the predecessor's `do_locks`; state, change log and per-object counters live
//! beside it in the same database so that the token check and the write are one transaction.
//! Plain text here (dotdo-core has no SQLite dependency); each backend executes it.

/// Schema version the backends store in `PRAGMA user_version`.
pub const SQL_HOT_SCHEMA_VERSION: i64 = 3;

/// The `CREATE TABLE IF NOT EXISTS` statements of the schema, the one-time fold of lease rows
/// that predate it and the marking of objects a file from before version 3 may have evicted (run
/// when a file's `user_version` is below [`SQL_HOT_SCHEMA_VERSION`]; each statement may run again
/// without harm).
pub const SQL_HOT_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS do_locks (
    do_id         TEXT PRIMARY KEY,
    node_id       TEXT NOT NULL,
    acquired_at   INTEGER NOT NULL,   -- microseconds since the Unix epoch
    expires_at    INTEGER NOT NULL,   -- microseconds since the Unix epoch
    fencing_token INTEGER NOT NULL,
    metadata      TEXT
);
CREATE TABLE IF NOT EXISTS do_objects (
    do_id             TEXT PRIMARY KEY,
    last_seq          INTEGER NOT NULL,   -- floor: effective last seq is max(this, newest change)
    truncated_through INTEGER NOT NULL,
    max_token         INTEGER NOT NULL
) WITHOUT ROWID;
-- A rowid table with a unique index, not WITHOUT ROWID: values go up to 2 MiB, and SQLite's
-- WITHOUT ROWID b-trees are slow with rows over ~1/20 of a page (restoring 1000 x 1 KB values
-- took 11 ms that way, 3 ms this way). Databases created with the earlier layout keep working:
-- every statement is the same for both.
CREATE TABLE IF NOT EXISTS do_state (
    do_id TEXT NOT NULL,
    key   TEXT NOT NULL,
    value BLOB NOT NULL,
    seq   INTEGER NOT NULL,
    UNIQUE (do_id, key)
);
CREATE TABLE IF NOT EXISTS do_changes (
    do_id TEXT NOT NULL,
    seq   INTEGER NOT NULL,
    key   TEXT NOT NULL,
    op    INTEGER NOT NULL,           -- 0 put, 1 delete
    value BLOB NOT NULL,
    token INTEGER NOT NULL,
    ts    INTEGER NOT NULL,           -- microseconds since the Unix epoch
    type  TEXT NOT NULL,
    PRIMARY KEY (do_id, seq)
) WITHOUT ROWID;
-- An object's fencing floor is max(do_objects.max_token, do_locks.fencing_token): an acquire
-- writes the lease row alone, and every fenced call checks its token against both rows. This
-- holds since schema version 2. In version 1 an acquire raised do_objects.max_token too, and
-- writes fenced against it alone: a version-1 library refuses a version-2 file, and every
-- version-1 process must be stopped before a version-2 process opens the file (see
-- docs/upgrading.md). Lease rows that were in the file before dotdo's schema (the predecessor's
-- do_locks) are folded in here, once. A row with a NULL id or token (a predecessor table created
-- without NOT NULL) is left out: the open failed on it with a constraint error, and a damaged
-- lease row is `Corrupt` when its object is used, as any other.
INSERT INTO do_objects (do_id, last_seq, truncated_through, max_token)
    SELECT do_id, 0, 0, fencing_token FROM do_locks WHERE do_id IS NOT NULL AND fencing_token IS NOT NULL
    ON CONFLICT (do_id) DO UPDATE SET max_token = max(max_token, excluded.max_token);
-- Objects whose live state was dropped by an evict and not restored since (since version 3):
-- the only way to tell an evicted object from one whose keys were all deleted (both have no
-- do_state rows and nothing pending). A restore deletes the row, writes leave it (after an
-- evict, hot holds only what was written since).
CREATE TABLE IF NOT EXISTS do_evicted (
    do_id TEXT PRIMARY KEY
) WITHOUT ROWID;
-- A file from before version 3 did not record evictions: an object ever written and without
-- live keys there may have been evicted, and is marked so (restored from cold storage at its
-- next activation, as before). Not one never written (leased only: nothing to restore, and no
-- restore would ever clear the mark). Once only: not when the program runs again on a file
-- another process upgraded meanwhile (it would mark objects emptied since).
INSERT INTO do_evicted (do_id)
    SELECT o.do_id FROM do_objects o WHERE NOT EXISTS (SELECT 1 FROM do_state s WHERE s.do_id = o.do_id)
        AND (o.last_seq > 0 OR EXISTS (SELECT 1 FROM do_changes c WHERE c.do_id = o.do_id))
        AND (SELECT user_version FROM pragma_user_version) < 3
    ON CONFLICT (do_id) DO NOTHING;
"#;

/// `object_info` of object `?1` in the SQL hot stores: its effective last sequence number,
/// `truncated_through`, `do_objects.max_token`, its live keys and their value bytes, whether it
/// is resident (not evicted), and its lease's token (0 without a lease row, -1 if the token is no
/// integer, as a NULL in a predecessor's table made without `NOT NULL`: damage the caller
/// refuses; `max()` in SQL, or a `coalesce`, would hide it). No row if the object has none.
pub const SQL_OBJECT_INFO: &str =
    "SELECT max(o.last_seq, coalesce((SELECT max(seq) FROM do_changes c WHERE c.do_id = o.do_id), 0)), \
       o.truncated_through, o.max_token, \
       (SELECT count(*) FROM do_state s WHERE s.do_id = o.do_id), \
       (SELECT coalesce(sum(length(value)), 0) FROM do_state s WHERE s.do_id = o.do_id), \
       NOT EXISTS (SELECT 1 FROM do_evicted e WHERE e.do_id = o.do_id), \
       coalesce((SELECT CASE WHEN typeof(fencing_token) = 'integer' THEN fencing_token ELSE -1 END \
         FROM do_locks WHERE do_id = ?1), 0) \
     FROM do_objects o WHERE o.do_id = ?1";

/// The tables of the schema and the columns each must have (a file may have more columns, as
/// the predecessor's `do_locks` has `metadata`).
pub const SQL_HOT_TABLES: &[(&str, &[&str])] = &[
    ("do_locks", &["do_id", "node_id", "acquired_at", "expires_at", "fencing_token"]),
    ("do_objects", &["do_id", "last_seq", "truncated_through", "max_token"]),
    ("do_state", &["do_id", "key", "value", "seq"]),
    ("do_changes", &["do_id", "seq", "key", "op", "value", "token", "ts", "type"]),
    ("do_evicted", &["do_id"]),
];

/// The schema version that introduced each table added after version 1 (a file of an older
/// dotdo version lacks it until it is upgraded).
const SQL_HOT_TABLES_SINCE: &[(&str, i64)] = &[("do_evicted", 3)];

/// Every `(table, column)` of a database's tables, as the backends read them to check a file
/// before and after opening it (SQLite's own `sqlite_*` tables left out). A virtual table is one
/// row with an empty column: asking for its columns loads its module, and one this SQLite lacks
/// (another application's extension) failed the whole query, so the file was not recognised as
/// another application's.
pub const SQL_TABLE_COLUMNS: &str = "SELECT m.name AS tbl, coalesce(p.name, '') AS col FROM sqlite_master m \
     LEFT JOIN pragma_table_info(CASE WHEN m.sql LIKE 'CREATE VIRTUAL%' THEN NULL ELSE m.name END) p \
     WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY m.name, p.cid";

/// Check a database's tables (`columns`: `(table, column)` as [`SQL_TABLE_COLUMNS`] reads them)
/// before dotdo writes its schema into it (`version`: its `user_version`). A file at version 0
/// with tables of its own is another application's database: `InvalidInput`, and it is left
/// untouched (dotdo would add its tables and claim the file's `user_version`), unless it has the
/// predecessor's lease table `do_locks` (its database, which dotdo takes over beside its other
/// tables) or its other tables are Litestream's (`_litestream_*`). Any dotdo table already there
/// must have its columns (`Corrupt` otherwise, before anything is written). A file at a dotdo
/// version must have every table that version has (a version-2 file has no `do_evicted` yet).
/// `source` names the file.
pub fn check_tables_before(version: i64, columns: &[(String, String)], source: &str) -> crate::Result<()> {
    refuse_foreign(version, columns, source)?;
    if version != 0 {
        return check_columns(columns, source, Some(version));
    }
    check_columns(columns, source, None)
}

/// `InvalidInput` if the database is another application's: tables of its own and, at
/// `user_version` 0, no predecessor lease table `do_locks`, or, at any other version (the
/// application's own migrations count there too, also past dotdo's), none of dotdo's tables.
/// Litestream's `_litestream_*` tables are no application's. Run before anything is written,
/// the WAL switch included; a SQL hot store leaves such a file untouched.
pub fn refuse_foreign(version: i64, columns: &[(String, String)], source: &str) -> crate::Result<()> {
    let dotdo = |t: &str| SQL_HOT_TABLES.iter().any(|(name, _)| name.eq_ignore_ascii_case(t));
    let mut foreign: Vec<&str> = columns
        .iter()
        .map(|(t, _)| t.as_str())
        .filter(|t| !dotdo(t) && !t.to_ascii_lowercase().starts_with("_litestream_"))
        .collect();
    foreign.dedup();
    let ours = if version == 0 {
        columns.iter().any(|(t, _)| t.eq_ignore_ascii_case("do_locks"))
    } else {
        columns.iter().any(|(t, _)| dotdo(t))
    };
    if !foreign.is_empty() && !ours {
        foreign.truncate(5);
        return Err(crate::Error::invalid(format!(
            "{source} is another application's SQLite database (user_version {version}, tables {}): dotdo keeps \
             its state in a database file of its own",
            foreign.join(", ")
        )));
    }
    Ok(())
}

/// Check that every table of the schema is there with its columns (after dotdo wrote its
/// schema, or in a file at this library's version): `Corrupt` naming the first table or column
/// missing.
pub fn check_tables_after(columns: &[(String, String)], source: &str) -> crate::Result<()> {
    check_columns(columns, source, Some(SQL_HOT_SCHEMA_VERSION))
}

/// Each dotdo table present has its columns; with `required` a dotdo schema version, each table
/// that version has is present.
fn check_columns(columns: &[(String, String)], source: &str, required: Option<i64>) -> crate::Result<()> {
    for (table, wanted) in SQL_HOT_TABLES {
        let since = SQL_HOT_TABLES_SINCE.iter().find(|(t, _)| t == table).map_or(1, |(_, v)| *v);
        let all = required.is_some_and(|version| version >= since);
        // SQLite's names are case-insensitive (a schema sent through some clients comes back as
        // `KEY`).
        let have: Vec<&str> =
            columns.iter().filter(|(t, _)| t.eq_ignore_ascii_case(table)).map(|(_, c)| c.as_str()).collect();
        if have.is_empty() && !all {
            continue;
        }
        if have.is_empty() {
            return Err(crate::Error::corrupt(format!(
                "{source}: table {table} is missing: not a dotdo database, or a damaged one"
            )));
        }
        if let Some(c) = wanted.iter().find(|c| !have.iter().any(|h| h.eq_ignore_ascii_case(c))) {
            return Err(crate::Error::corrupt(format!(
                "{source}: table {table} has no column {c}: not a dotdo database, or a damaged one"
            )));
        }
    }
    Ok(())
}

/// The unique keys each table of the schema must have: the statements' `ON CONFLICT` targets
/// (and the uniqueness the fencing relies on). A file whose table lacks one (rebuilt by hand,
/// damaged) would refuse every acquire or write with an SQL error.
pub const SQL_HOT_KEYS: &[(&str, &[&str])] = &[
    ("do_locks", &["do_id"]),
    ("do_objects", &["do_id"]),
    ("do_state", &["do_id", "key"]),
    ("do_changes", &["do_id", "seq"]),
    ("do_evicted", &["do_id"]),
];

/// Every `(table, unique index, column)` of the schema's tables, as the backends read them to
/// check a file against [`SQL_HOT_KEYS`] with [`check_keys`] (a primary key shows as an index
/// too, except a rowid alias, which no key of the schema is).
pub const SQL_UNIQUE_KEYS: &str = "SELECT m.name, il.name, coalesce(ii.name, '') FROM sqlite_master m, \
     pragma_index_list(m.name) il, pragma_index_info(il.name) ii WHERE m.type = 'table' AND il.\"unique\" = 1 \
     AND il.partial = 0 AND lower(m.name) IN ('do_locks', 'do_objects', 'do_state', 'do_changes', 'do_evicted') \
     ORDER BY m.name, il.name, ii.seqno";

/// `Corrupt` naming `source` if a table of the schema that the database has (`columns`, as
/// [`SQL_TABLE_COLUMNS`] reads them) lacks its unique key ([`SQL_HOT_KEYS`]; `keys`: the rows of
/// [`SQL_UNIQUE_KEYS`]). Run before anything is written, and again once the schema is in place.
pub fn check_keys(keys: &[(String, String, String)], columns: &[(String, String)], source: &str) -> crate::Result<()> {
    for (table, wanted) in SQL_HOT_KEYS {
        if !columns.iter().any(|(t, _)| t.eq_ignore_ascii_case(table)) {
            continue;
        }
        let mut indexes: Vec<(&str, Vec<String>)> = Vec::new();
        for (_, index, column) in keys.iter().filter(|(t, _, _)| t.eq_ignore_ascii_case(table)) {
            match indexes.iter_mut().find(|(i, _)| *i == index.as_str()) {
                Some((_, cols)) => cols.push(column.to_ascii_lowercase()),
                None => indexes.push((index.as_str(), vec![column.to_ascii_lowercase()])),
            }
        }
        let mut want: Vec<String> = wanted.iter().map(|c| c.to_string()).collect();
        want.sort();
        let found = indexes.into_iter().any(|(_, mut cols)| {
            cols.sort();
            cols == want
        });
        if !found {
            return Err(crate::Error::corrupt(format!(
                "{source}: table {table} has no unique key ({}): not a dotdo database, or a damaged one",
                wanted.join(", ")
            )));
        }
    }
    Ok(())
}

/// The most bytes of values one `read_changes` of the SQL stores returns (at least one change,
/// whatever its size): a drain reads on after the last change returned, so a backlog of large
/// values is never loaded whole (nor sent in one answer by a remote primary).
pub const READ_CHANGES_BYTES: usize = 8 << 20;

/// One `do_changes` row as the backends select it:
/// `(seq, key, op code, value, token, ts µs, type)` (`SELECT seq, key, op, value, token, ts, type`).
pub type ChangeRow = (u64, String, i64, Vec<u8>, u64, i64, String);

/// The change record of `object` stored as `row` (op code 0 put, 1 delete). A row no dotdo
/// writer stores (an unknown op code, a sequence number of 0 or above `MAX_SEQ`, a token of 0 or
/// above `FencingToken::MAX`, an empty or overlong key, an oversized value, an invalid type
/// name) is `Corrupt`, naming `source` (the database): passed on, the cold sink refused the drain
/// as the caller's `InvalidInput`, or a token above the holder's read as another node's takeover.
pub fn change_record(object: &crate::ObjectId, row: ChangeRow, source: &str) -> crate::Result<crate::ChangeRecord> {
    let (seq, key, op, value, token, ts, type_name) = row;
    let op = match op {
        0 => crate::Op::Put,
        1 => crate::Op::Delete,
        other => {
            return Err(crate::Error::corrupt(format!(
                "{source}: change {seq} of {object} has unknown op code {other}"
            )))
        }
    };
    let record = crate::ChangeRecord {
        object: object.clone(),
        seq,
        key,
        op,
        value: bytes::Bytes::from(value),
        token: crate::FencingToken::new(token),
        timestamp: crate::Timestamp::from_micros(ts),
        type_name,
    };
    if seq == 0 || seq > crate::MAX_SEQ {
        return Err(crate::Error::corrupt(format!(
            "{source}: change of {object} with sequence number {seq}, outside 1..={}",
            crate::MAX_SEQ
        )));
    }
    record.validate().map_err(|e| crate::Error::corrupt(format!("{source}: a stored change no writer makes: {e}")))?;
    Ok(record)
}

/// The longest busy timeout SQLite can take: it counts milliseconds in a C `int`.
pub const MAX_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(i32::MAX as u64);

/// `InvalidInput` for a busy timeout SQLite cannot represent (over [`MAX_BUSY_TIMEOUT`], about
/// 24.8 days): rusqlite panics on one and libsql silently truncates it.
pub fn validate_busy_timeout(timeout: std::time::Duration) -> crate::Result<()> {
    if timeout > MAX_BUSY_TIMEOUT {
        return Err(crate::Error::invalid(format!(
            "busy_timeout {timeout:?} is over SQLite's maximum of {MAX_BUSY_TIMEOUT:?} (i32 milliseconds)"
        )));
    }
    Ok(())
}

/// `path` made absolute against the working directory, for a plain path or a `file:` URI (whose
/// path part is made absolute, its query kept; the working directory's `%`, `?` and `#` are
/// escaped as the URI needs). Both SQL backends open their read connections lazily: a relative
/// path would follow a later change of the working directory to another database. A path that
/// cannot be made absolute (no working directory) is `InvalidInput`.
pub fn absolute_database_path(path: &std::path::Path) -> crate::Result<std::path::PathBuf> {
    let bad =
        |e: std::io::Error| crate::Error::invalid(format!("database path {}: {e}", path.display())).with_source(e);
    let text = path_bytes(path);
    let Some(uri) = text.strip_prefix(b"file:") else { return std::path::absolute(path).map_err(bad) };
    let (file, query) = uri.split_at(uri.iter().position(|&b| b == b'?').unwrap_or(uri.len()));
    if file.starts_with(b"/") {
        return Ok(path.to_path_buf());
    }
    let cwd = std::env::current_dir().map_err(bad)?;
    let mut out = b"file:".to_vec();
    for &b in path_bytes(&cwd).iter() {
        match b {
            b'%' => out.extend_from_slice(b"%25"),
            b'?' => out.extend_from_slice(b"%3f"),
            b'#' => out.extend_from_slice(b"%23"),
            b => out.push(b),
        }
    }
    while out.ends_with(b"/") {
        out.pop();
    }
    out.push(b'/');
    out.extend_from_slice(file);
    out.extend_from_slice(query);
    Ok(path_from_bytes(out))
}

/// A path's own bytes (on Unix a name need not be UTF-8: a lossy conversion would name another
/// file; elsewhere the path's text).
fn path_bytes(path: &std::path::Path) -> std::borrow::Cow<'_, [u8]> {
    #[cfg(unix)]
    {
        std::borrow::Cow::Borrowed(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
    }
    #[cfg(not(unix))]
    {
        match path.to_string_lossy() {
            std::borrow::Cow::Borrowed(s) => std::borrow::Cow::Borrowed(s.as_bytes()),
            std::borrow::Cow::Owned(s) => std::borrow::Cow::Owned(s.into_bytes()),
        }
    }
}

/// The path of [`path_bytes`].
fn path_from_bytes(bytes: Vec<u8>) -> std::path::PathBuf {
    #[cfg(unix)]
    {
        std::path::PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(bytes))
    }
    #[cfg(not(unix))]
    {
        std::path::PathBuf::from(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Whether `path` names a database private to one connection (`""`, `:memory:`, an empty or
/// in-memory `file:` URI): each connection opening it gets its own, empty one.
pub fn is_private_database(path: &std::path::Path) -> bool {
    let p = path.to_string_lossy();
    p.is_empty()
        || p == ":memory:"
        || p == "file:"
        || p.starts_with("file:?")
        || p.starts_with("file::memory:")
        || uri_parameters(&p).any(|param| param == "mode=memory")
}

/// `InvalidInput` for a `file:` URI opening the database in SQLite's shared-cache mode
/// (`cache=shared`): its connections share one page cache with table-level locks, so a read
/// during any write fails `SQLITE_LOCKED`, which no busy timeout waits out (reads and
/// checkpoints failed while writes ran).
pub fn refuse_shared_cache(path: &std::path::Path) -> crate::Result<()> {
    let p = path.to_string_lossy();
    if uri_parameters(&p).any(|param| param == "cache=shared") {
        return Err(crate::Error::invalid(format!(
            "database {p}: shared-cache mode (`cache=shared`) is not supported: its readers fail while a write \
             runs; drop the parameter"
        )));
    }
    Ok(())
}

/// The parameters of a `file:` URI's query (`name=value`, as written), none for a plain path.
/// Only the query counts: a directory named `mode=memory` is part of the path.
fn uri_parameters(p: &str) -> impl Iterator<Item = &str> {
    let query = p.strip_prefix("file:").and_then(|uri| uri.split('#').next()?.split_once('?')).map(|(_, q)| q);
    query.into_iter().flat_map(|q| q.split('&'))
}

/// `path` for a connection that must not create the database (a store's readers and checkpoint
/// connection open the file its writer made): a `file:` URI's `mode=rwc` becomes `mode=rw`.
/// SQLite refuses a URI asking for more access than the open flags allow, so without this a
/// `file:...?mode=rwc` database failed on every read.
pub fn without_create_mode(path: &std::path::Path) -> std::path::PathBuf {
    // Parameters are ASCII: found in the lossy text, rewritten in the path's own bytes.
    if !uri_parameters(&path.to_string_lossy()).any(|param| param == "mode=rwc") {
        return path.to_path_buf();
    }
    let p = path_bytes(path);
    let (head, fragment) = match p.iter().position(|&b| b == b'#') {
        Some(i) => (&p[..i], Some(&p[i..])),
        None => (&p[..], None),
    };
    let Some(q) = head.iter().position(|&b| b == b'?') else { return path.to_path_buf() };
    let mut out = head[..=q].to_vec();
    for (i, param) in head[q + 1..].split(|&b| b == b'&').enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        out.extend_from_slice(if param == b"mode=rwc" { b"mode=rw" } else { param });
    }
    out.extend_from_slice(fragment.unwrap_or_default());
    path_from_bytes(out)
}

/// The file at a database's path, as a store opened it: SQLite notices a deleted or replaced
/// database file only when it opens a rollback journal, never in WAL mode, so a store would go
/// on writing into a file no other process opens (two databases, two lease tables). The SQL hot
/// stores' checkpoint threads ask [`replaced`](Self::replaced) every round.
#[derive(Debug, Clone)]
pub struct FileWatch {
    file: Option<std::path::PathBuf>,
    opened: FileAt,
}

impl FileWatch {
    /// Remember the identity of the file at `path` (a path or a `file:` URI) now.
    pub fn new(path: &std::path::Path) -> Self {
        let file = file_path_of(path);
        let opened = file.as_deref().map_or(FileAt::Unknown, file_identity);
        FileWatch { file, opened }
    }

    /// Whether the file at the path is no longer the one remembered (deleted, or another file
    /// put in its place). A transient error reading the path is no verdict (`false`: asked
    /// again next round), nor is a path whose identity was not known at first.
    pub fn replaced(&self) -> bool {
        let now = self.file.as_deref().map_or(FileAt::Unknown, file_identity);
        matches!(self.opened, FileAt::File(..)) && now != FileAt::Unknown && now != self.opened
    }

    /// The database's WAL file, if the path names a file: `<file>-wal` of the file the path
    /// resolves to, symlinks followed, as SQLite names it (through a symlinked database path,
    /// `<link>-wal` does not exist: the WAL was never synced, and that counted as done).
    fn wal(&self) -> Option<std::path::PathBuf> {
        self.file.as_deref().map(|f| {
            // (On Unix only: SQLite's Windows VFS does not resolve links, `canonicalize` would.)
            let resolved = if cfg!(unix) { std::fs::canonicalize(f).ok() } else { None };
            let mut wal = resolved.unwrap_or_else(|| f.to_path_buf()).into_os_string();
            wal.push("-wal");
            std::path::PathBuf::from(wal)
        })
    }
}

/// Sync the WAL file at `wal` to disk (a file that is not there has nothing to sync).
fn sync_wal(wal: &std::path::Path) -> std::io::Result<()> {
    match std::fs::OpenOptions::new().write(true).open(wal) {
        Ok(f) => f.sync_data(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// What is at a database's path.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FileAt {
    /// A file of this identity (device, inode).
    File(u64, u64),
    /// No file.
    Gone,
    /// Not known (an I/O error, a platform without inodes): no verdict this round.
    Unknown,
}

/// The file system path of a database path or `file:` URI (its query dropped, its
/// percent-escapes decoded as SQLite decodes them; `None` for an escape that is not two hex
/// digits or decodes to a NUL).
fn file_path_of(path: &std::path::Path) -> Option<std::path::PathBuf> {
    // The path's own bytes (on Unix a name need not be UTF-8).
    let text = path_bytes(path);
    let Some(uri) = text.strip_prefix(b"file:") else { return Some(path.to_path_buf()) };
    let file = uri.split(|&b| b == b'?' || b == b'#').next().unwrap_or_default();
    let file = file.strip_prefix(b"//localhost").or_else(|| file.strip_prefix(b"//")).unwrap_or(file);
    if file.is_empty() {
        return None;
    }
    let mut bytes = Vec::with_capacity(file.len());
    let mut rest = file;
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            // Two hex digits, as SQLite decodes them (`u8::from_str_radix` would take `+A`).
            let [hi, lo] = *tail.get(..2)? else { return None };
            let digit = |d: u8| char::from(d).to_digit(16);
            let decoded = u8::try_from(digit(hi)? * 16 + digit(lo)?).ok().filter(|&d| d != 0)?;
            bytes.push(decoded);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    #[cfg(unix)]
    {
        Some(path_from_bytes(bytes))
    }
    #[cfg(not(unix))]
    {
        // Not `path_from_bytes`, which converts lossily: a name that is no text names no file.
        String::from_utf8(bytes).ok().map(std::path::PathBuf::from)
    }
}

/// The identity of the file at `path`.
#[cfg(unix)]
fn file_identity(path: &std::path::Path) -> FileAt {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => FileAt::File(m.dev(), m.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileAt::Gone,
        Err(_) => FileAt::Unknown,
    }
}

/// The identity of the file at `path`: not available here (no check).
#[cfg(not(unix))]
fn file_identity(_path: &std::path::Path) -> FileAt {
    FileAt::Unknown
}

/// What one round of a [`CheckpointThread`] found.
#[derive(Debug)]
pub enum CheckpointRound {
    /// `PRAGMA wal_checkpoint(PASSIVE)` ran: frames in the WAL, and frames copied into the
    /// database file (frames a reader still needs, or a checkpoint another process runs, wait
    /// for a later round: SQLite reports them as busy, not as an error).
    Done {
        /// Frames in the WAL.
        log: i64,
        /// Frames copied into the database file.
        copied: i64,
        /// `PRAGMA data_version` on the round's connection, read before the checkpoint (`None`:
        /// not read). It changes when another connection commits: a round that leaves frames
        /// uncopied syncs the WAL only if it changed since the last sync (`None`: every such
        /// round syncs).
        data_version: Option<i64>,
    },
    /// The checkpoint failed (said at once, then every 100th failure of a streak; retried next
    /// round).
    Failed(String),
    /// The round found the database file deleted or replaced before it could run (while it
    /// waited for its turn: a round that waits on the store's writer, which a write holds
    /// through a long busy wait, looks at the file meanwhile): as the thread's own check.
    Replaced,
}

/// WAL frames a [`CheckpointThread`] could not copy for it to warn that the WAL is not
/// shrinking (64 MiB of 4 KiB pages).
pub const STUCK_WAL_FRAMES: i64 = 16 * 1024;

/// WAL frames past which a [`CheckpointThread`] warns that the WAL file keeps growing although
/// its frames are copied (1 GiB of 4 KiB pages): readers overlapping without a break keep it
/// from starting over. Well above what one batch of the largest size writes.
pub const GROWING_WAL_FRAMES: i64 = 256 * 1024;

/// The `journal_size_limit` (bytes) of the SQL stores' connections for a WAL checkpointed at
/// `wal_autocheckpoint_pages`: once it starts over, a WAL that one large batch grew is cut back
/// to that size (4 KiB pages, at least 4 MiB) instead of keeping its largest size until every
/// connection closes.
pub fn wal_size_limit(wal_autocheckpoint_pages: u32) -> u64 {
    u64::from(wal_autocheckpoint_pages.max(1024)) * 4096
}

/// Refuse settings under which nothing checkpoints the WAL (no automatic checkpoints and no
/// background thread): it would grow with every write until the last connection closes.
pub fn validate_checkpointing(
    wal_autocheckpoint_pages: u32,
    background_checkpoint: Option<std::time::Duration>,
) -> crate::Result<()> {
    // SQLite reads the pragma's value as a 32-bit integer and takes anything larger as 0: off.
    if wal_autocheckpoint_pages > i32::MAX as u32 {
        return Err(crate::Error::invalid(format!(
            "wal_autocheckpoint_pages {wal_autocheckpoint_pages} is over {} (SQLite would read it as 0: no automatic \
             checkpoints)",
            i32::MAX
        )));
    }
    if wal_autocheckpoint_pages == 0 && background_checkpoint.is_none_or(|d| d.is_zero()) {
        return Err(crate::Error::invalid(
            "wal_autocheckpoint_pages 0 with background_checkpoint off: nothing would checkpoint the WAL, which \
             would grow with every write until the store is closed",
        ));
    }
    Ok(())
}

/// Check a SQL store's page cache size in KiB: SQLite reads `PRAGMA cache_size = -N` as a 32-bit
/// integer and takes a larger `N` as 0 (its minimal cache), silently.
pub fn validate_cache_kib(cache_kib: u32) -> crate::Result<()> {
    if cache_kib > i32::MAX as u32 {
        return Err(crate::Error::invalid(format!(
            "cache_kib {cache_kib} is over {} (SQLite would read it as 0: its minimal page cache)",
            i32::MAX
        )));
    }
    Ok(())
}

/// A thread that runs a SQL hot store's background WAL checkpoint (`round`, typically
/// `PRAGMA wal_checkpoint(PASSIVE)` on a connection of its own) every `every`, and says when
/// the WAL stops shrinking or checkpoints fail. A round that leaves frames uncopied (a read
/// transaction holds them) syncs the WAL file itself: SQLite syncs the WAL only when a
/// checkpoint copies frames, so under `synchronous=NORMAL` the commits a long read overlapped
/// would wait for it to end to reach the disk, while the checkpoint period is documented to
/// bound what a power loss can take. Before each round it asks its [`FileWatch`]
/// whether the database file was deleted or replaced; if so it says so and ends, and
/// [`replaced`](Self::replaced) is true from then on (the store refuses every call). Stopped and
/// joined on drop (at most one round is in progress then).
#[derive(Debug)]
pub struct CheckpointThread {
    stop: std::sync::Arc<(parking_lot::Mutex<bool>, parking_lot::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
    replaced: std::sync::Arc<std::sync::atomic::AtomicBool>,
    wal_syncs: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// The `InvalidInput` refusal (by `store`, a crate name) of a database that SQLite left in
/// journal mode `mode` when asked for WAL: a VFS without shared memory (`vfs=unix-dotfile`), or
/// a file opened `immutable`, stays in a rollback journal without an error, where
/// `synchronous=NORMAL` may corrupt the file on power loss and readers block writers.
pub fn not_wal_error(doing: &str, mode: &dyn std::fmt::Debug, store: &str) -> crate::Error {
    crate::Error::invalid(format!(
        "{doing}: the database stays in journal mode {mode:?}, not WAL (a VFS without shared memory, or an \
         `immutable`/`nolock` URI parameter?); {store} needs WAL"
    ))
}

/// The `Corrupt` error of a call on a store whose database file `path` was deleted or replaced
/// while open (see [`CheckpointThread::replaced`]).
pub fn replaced_file_error(doing: &str, path: &str) -> crate::Error {
    crate::Error::corrupt(format!(
        "{doing}: {path} was deleted or replaced while this store had it open; writes since may be in the old \
         file only: drop every handle of this store (clones included) and make sure no other process still \
         has the old file open, then open the store again (a store opened beside a live handle shares the \
         old file's -wal and -shm and may apply the old WAL to the new file)"
    ))
}

impl CheckpointThread {
    /// Whether the thread found the database file deleted or replaced (it has ended then).
    pub fn replaced(&self) -> bool {
        self.replaced.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many rounds synced the WAL file themselves (frames were left uncopied).
    pub fn wal_syncs(&self) -> u64 {
        self.wal_syncs.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Start the thread `name`; `shown_path` names the database in log lines; `watch`: the
    /// file as the store opened it.
    pub fn start(
        name: &str,
        every: std::time::Duration,
        shown_path: String,
        watch: FileWatch,
        mut round: impl FnMut() -> CheckpointRound + Send + 'static,
    ) -> crate::Result<Self> {
        let stop = std::sync::Arc::new((parking_lot::Mutex::new(false), parking_lot::Condvar::new()));
        let flag = stop.clone();
        let replaced = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let found = replaced.clone();
        let wal_syncs = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let synced = wal_syncs.clone();
        let wal = watch.wal();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut failures = 0u64;
                let (mut stuck, mut growing) = (false, false);
                // The `data_version` of the last round that synced the WAL itself.
                let mut synced_version: Option<i64> = None;
                loop {
                    {
                        let (lock, cv) = &*flag;
                        let mut stopped = lock.lock();
                        if !*stopped {
                            cv.wait_for(&mut stopped, every);
                        }
                        if *stopped {
                            return;
                        }
                    }
                    let replaced = || {
                        tracing::error!(path = %shown_path, "the database file was deleted or replaced while open; refusing every call");
                        found.store(true, std::sync::atomic::Ordering::SeqCst);
                    };
                    if watch.replaced() {
                        return replaced();
                    }
                    match round() {
                        CheckpointRound::Replaced => return replaced(),
                        CheckpointRound::Done { log, copied, data_version } => {
                            failures = 0;
                            // Frames nothing can copy (a reader holds them): the WAL only grows.
                            let behind = log.saturating_sub(copied);
                            if behind >= STUCK_WAL_FRAMES && !stuck {
                                tracing::warn!(frames = behind, path = %shown_path, "the WAL is not shrinking: a long read transaction holds frames the checkpoint cannot copy");
                            }
                            stuck = behind >= STUCK_WAL_FRAMES;
                            // Copied, but the file never starts over (readers keep overlapping).
                            if log >= GROWING_WAL_FRAMES && behind < STUCK_WAL_FRAMES && !growing {
                                tracing::warn!(frames = log, path = %shown_path, "the WAL file keeps growing although it is checkpointed: read transactions that overlap without a break keep it from starting over");
                            }
                            growing = log >= GROWING_WAL_FRAMES;
                            // Nothing committed since the last sync: nothing new to sync (a
                            // long reader, Litestream's say, would have the WAL synced 20
                            // times a second with nothing in it).
                            let unchanged = data_version.is_some() && data_version == synced_version;
                            if behind > 0 && !unchanged {
                                if let Some(wal) = &wal {
                                    match sync_wal(wal) {
                                        Ok(()) => {
                                            synced.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                            synced_version = data_version;
                                        }
                                        Err(e) => {
                                            tracing::warn!(error = %e, path = %shown_path, "syncing the WAL file failed")
                                        }
                                    }
                                }
                            }
                        }
                        CheckpointRound::Failed(e) => {
                            // An error is not routine (I/O, a full disk, a damaged file): said at
                            // once, then every 100th of a streak.
                            failures += 1;
                            if failures % 100 == 1 {
                                tracing::warn!(error = %e, failures, path = %shown_path, "background WAL checkpoint failed");
                            } else {
                                tracing::debug!(error = %e, "background WAL checkpoint failed; retrying next round");
                            }
                        }
                    }
                }
            })
            .map_err(|e| crate::Error::backend(format!("starting the WAL checkpoint thread: {e}")))?;
        Ok(CheckpointThread { stop, thread: Some(thread), replaced, wal_syncs })
    }
}

impl Drop for CheckpointThread {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock() = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            // At most one checkpoint round in progress.
            let _ = t.join();
        }
    }
}

/// Whether the process is out of file descriptors just now (`EMFILE`, or the system's table
/// full: `ENFILE`): tried by opening `/dev/null`. For a store whose new connection failed to
/// open (SQLite's `CANTOPEN`, which does not say why): then the failure is the moment's, and
/// retryable, where a file made unreadable is not.
pub fn out_of_file_descriptors() -> bool {
    match std::fs::File::open("/dev/null") {
        Ok(_) => false,
        // EMFILE, ENFILE (the same numbers on Linux and the BSDs).
        Err(e) => matches!(e.raw_os_error(), Some(23 | 24)),
    }
}

#[cfg(test)]
mod tests {
    /// The WAL synced is the one SQLite writes: beside the file a symlinked path resolves to;
    /// `file:` URIs are decoded (with `%` escapes the watch was off).
    #[cfg(unix)]
    #[test]
    fn the_wal_watched_is_sqlites_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real.db");
        std::fs::write(&real, b"").expect("file");
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let wal = super::FileWatch::new(&link).wal().expect("a file");
        let want = std::fs::canonicalize(dir.path()).expect("dir").join("real.db-wal");
        assert_eq!(wal, want);
        assert_eq!(
            super::file_path_of(std::path::Path::new("file:/srv/My%20Data/hot.db?mode=rwc")).as_deref(),
            Some(std::path::Path::new("/srv/My Data/hot.db"))
        );
        assert_eq!(super::file_path_of(std::path::Path::new("file:/srv/a%2")), None, "a cut escape");
        assert_eq!(super::file_path_of(std::path::Path::new("file:/srv/a%00b")), None, "a NUL");
        assert_eq!(super::file_path_of(std::path::Path::new("file:/srv/a%+Ab")), None, "not two hex digits");
        // A name that is not UTF-8 keeps its bytes.
        use std::os::unix::ffi::OsStrExt;
        let raw = std::path::Path::new(std::ffi::OsStr::from_bytes(b"file:/srv/\xffx.db"));
        assert_eq!(
            super::file_path_of(raw).as_deref(),
            Some(std::path::Path::new(std::ffi::OsStr::from_bytes(b"/srv/\xffx.db")))
        );
    }

    use super::{absolute_database_path, check_tables_before, is_private_database, SQL_HOT_TABLES};
    use crate::ErrorKind;
    use std::path::Path;

    fn cols(tables: &[(&str, &[&str])]) -> Vec<(String, String)> {
        tables.iter().flat_map(|(t, cs)| cs.iter().map(move |c| (t.to_string(), c.to_string()))).collect()
    }

    /// Version-0 files: empty, Litestream's and the predecessor's (its `do_locks` beside its own
    /// tables) are dotdo's to take; another application's is `InvalidInput`; a dotdo table with
    /// columns missing is `Corrupt` before anything is written. At a dotdo version every table
    /// must be there.
    #[test]
    fn which_files_dotdo_takes_over() {
        let locks: (&str, &[&str]) = ("do_locks", SQL_HOT_TABLES[0].1);
        let app: (&str, &[&str]) = ("users", &["id", "name"]);
        let ok = |v: i64, t: &[(&str, &[&str])]| check_tables_before(v, &cols(t), "f.db");
        ok(0, &[]).expect("a new file");
        ok(0, &[("_litestream_seq", &["id", "seq"]), ("_litestream_lock", &["id"])]).expect("Litestream's tables");
        ok(0, &[locks, app]).expect("the predecessor's database");
        let e = ok(0, &[app]).expect_err("another application's");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
        let e = ok(0, &[locks, ("do_state", &["do_id", "key", "value"])]).expect_err("a column missing");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        let e = ok(2, &[locks]).expect_err("tables missing at a dotdo version");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        ok(3, SQL_HOT_TABLES).expect("a dotdo file");
        // A file of version 2 predates `do_evicted` (added when it is upgraded); at version 3
        // it must be there.
        let v2: Vec<(&str, &[&str])> = SQL_HOT_TABLES.iter().filter(|(t, _)| *t != "do_evicted").copied().collect();
        ok(2, &v2).expect("a version-2 file");
        let e = ok(3, &v2).expect_err("do_evicted missing at version 3");
        assert!(e.to_string().contains("do_evicted"), "{e}");
        let upper: Vec<(&str, &[&str])> = SQL_HOT_TABLES.iter().map(|(t, c)| (*t, *c)).collect();
        let mut shouted = cols(&upper);
        shouted.iter_mut().for_each(|(_, c)| *c = c.to_ascii_uppercase());
        check_tables_before(2, &shouted, "f.db").expect("names are case-insensitive");
    }

    /// Relative `file:` URIs are made absolute (query kept, the working directory escaped);
    /// absolute ones and private databases are left as they are.
    #[test]
    fn database_paths_and_uris_are_made_absolute() {
        let cwd = std::env::current_dir()
            .expect("cwd")
            .to_string_lossy()
            .replace('%', "%25")
            .replace('?', "%3f")
            .replace('#', "%23");
        let abs = |p: &str| absolute_database_path(Path::new(p)).expect("path").to_string_lossy().into_owned();
        assert_eq!(abs("file:data/hot.db?mode=rwc"), format!("file:{cwd}/data/hot.db?mode=rwc"));
        assert_eq!(abs("file:hot.db"), format!("file:{cwd}/hot.db"));
        assert_eq!(abs("file:/srv/hot.db?cache=shared"), "file:/srv/hot.db?cache=shared");
        assert_eq!(abs("file:///srv/hot.db"), "file:///srv/hot.db");
        assert!(Path::new(&abs("data/hot.db")).is_absolute());
        for private in ["", ":memory:", "file:", "file:?cache=private", "file::memory:", "file:x?mode=memory"] {
            assert!(is_private_database(Path::new(private)), "{private}");
        }
        assert!(!is_private_database(Path::new("file:hot.db")));
        // Only the query says "memory": a directory of that name is part of a file's path.
        for file in ["file:/srv/mode=memory/hot.db", "file:/srv/mode=memory/hot.db?mode=rwc", "file:x#?mode=memory"] {
            assert!(!is_private_database(Path::new(file)), "{file}");
        }
        assert!(is_private_database(Path::new("file:x?cache=shared&mode=memory")));
    }

    /// Connections that must not create the database ask for `mode=rw` where the URI says
    /// `mode=rwc`; everything else is kept as written.
    #[test]
    fn create_mode_is_dropped_for_connections_that_must_not_create() {
        let rw = |p: &str| super::without_create_mode(Path::new(p)).to_string_lossy().into_owned();
        assert_eq!(rw("file:/srv/hot.db?mode=rwc"), "file:/srv/hot.db?mode=rw");
        assert_eq!(
            rw("file:/srv/hot.db?cache=shared&mode=rwc&vfs=unix"),
            "file:/srv/hot.db?cache=shared&mode=rw&vfs=unix"
        );
        assert_eq!(rw("file:/srv/hot.db?mode=rwc#frag"), "file:/srv/hot.db?mode=rw#frag");
        for same in
            ["/srv/mode=rwc/hot.db", "file:/srv/mode=rwc/hot.db", "file:/srv/hot.db?mode=ro", "file:/srv/hot.db"]
        {
            assert_eq!(rw(same), same);
        }
    }

    /// A `file:` URI whose path is not UTF-8 keeps its bytes when made absolute or opened
    /// without create mode: a lossy conversion turned them into U+FFFD, so the readers (or the
    /// whole store, for a relative URI) opened another file.
    #[cfg(unix)]
    #[test]
    fn non_utf8_uris_keep_their_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let path = |b: &[u8]| Path::new(std::ffi::OsStr::from_bytes(b)).to_path_buf();
        let rw = super::without_create_mode(&path(b"file:/srv/\xffx.db?mode=rwc#f"));
        assert_eq!(rw.as_os_str().as_bytes(), b"file:/srv/\xffx.db?mode=rw#f");
        let abs = absolute_database_path(&path(b"file:\xffx.db?mode=rwc")).expect("absolute");
        assert!(abs.as_os_str().as_bytes().ends_with(b"/\xffx.db?mode=rwc"), "{abs:?}");
        assert!(abs.as_os_str().as_bytes().starts_with(b"file:/"), "{abs:?}");
    }

    /// dotdo-libsql runs the schema one statement per step, split on `;`: a `;` inside a comment
    /// would cut a statement in two (and fail every open of a new file).
    #[test]
    fn the_schema_splits_into_whole_statements_on_semicolons() {
        let parts: Vec<&str> = super::SQL_HOT_SCHEMA.split(';').map(str::trim).filter(|s| !s.is_empty()).collect();
        assert!(parts.len() >= 5, "{parts:?}");
        for part in parts {
            let code: Vec<&str> = part
                .lines()
                .map(|l| l.split("--").next().unwrap_or_default().trim())
                .filter(|l| !l.is_empty())
                .collect();
            let first = code.first().copied().unwrap_or_default();
            assert!(
                first.starts_with("CREATE TABLE") || first.starts_with("INSERT INTO"),
                "not a whole statement: {part}"
            );
        }
    }
}
