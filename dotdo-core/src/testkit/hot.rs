//! Conformance cases for [`HotStore`](crate::HotStore) + [`ConsistencyGuard`](crate::ConsistencyGuard) backends.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use proptest_state_machine::ReferenceStateMachine;

use super::{nid, oid, proptest_cases, run_catching, runtime, CaseFailure, HotFactory, HotFixture, KIT_EPOCH};
use crate::error::ErrorKind;
use crate::hot::HotStoreExt;
use crate::ids::{FencingToken, ObjectId, MAX_VALUE_BYTES};
use crate::record::{KeyRange, Op, WriteBatch};
use crate::time::{ManualClock, Timestamp};
use crate::{Clock, Lease};

const TTL: Duration = Duration::from_secs(10);

/// `object`'s change records after `after`, at most `limit`, read on while the store answers
/// short (the contract lets `read_changes` answer fewer than the limit while more exist).
pub(crate) async fn changes(
    hot: &dyn crate::HotStore,
    object: &crate::ObjectId,
    after: crate::Seq,
    limit: usize,
) -> crate::Result<Vec<crate::ChangeRecord>> {
    let mut out: Vec<crate::ChangeRecord> = Vec::new();
    while out.len() < limit {
        let from = out.last().map_or(after, |r| r.seq);
        let page = hot.read_changes(object, from, limit - out.len()).await?;
        if page.is_empty() {
            break;
        }
        out.extend(page);
    }
    Ok(out)
}

async fn open(f: &HotFactory) -> (HotFixture, ManualClock) {
    let clock = ManualClock::new(KIT_EPOCH);
    (f(clock.clone()).await, clock)
}

async fn lease(fx: &HotFixture, obj: &str, holder: &str) -> Lease {
    fx.guard.acquire(&oid(obj), &nid(holder), TTL).await.expect("acquire on a free object succeeds")
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Put, then get returns the value; overwrite replaces it.
pub async fn put_then_get_roundtrips(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let r = fx.hot.put(&l.object, l.token, "T", "k", b("v1")).await.expect("put");
    assert_eq!((r.first_seq, r.last_seq), (1, 1));
    assert_eq!(fx.hot.get(&l.object, "k").await.expect("get"), Some(b("v1")));
    fx.hot.put(&l.object, l.token, "T", "k", b("v2")).await.expect("overwrite");
    assert_eq!(fx.hot.get(&l.object, "k").await.expect("get"), Some(b("v2")));
    assert_eq!(fx.hot.get(&l.object, "other").await.expect("get"), None);
    let info = fx.hot.object_info(&l.object).await.expect("info").expect("object exists");
    assert_eq!((info.last_seq, info.keys, info.value_bytes), (2, 1, 2));
    assert_eq!(info.max_token, l.token, "no higher token was ever issued or presented");
}

/// A delete removes the key from state and appears in the change log.
pub async fn delete_removes_key_and_is_logged(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    fx.hot.put(&l.object, l.token, "T", "k", b("v")).await.expect("put");
    fx.hot.delete(&l.object, l.token, "T", "k").await.expect("delete");
    fx.hot.delete(&l.object, l.token, "T", "never-existed").await.expect("delete of absent key is ok");
    assert_eq!(fx.hot.get(&l.object, "k").await.expect("get"), None);
    let log = changes(&*fx.hot, &l.object, 0, 100).await.expect("log");
    assert_eq!(log.len(), 3);
    assert_eq!(log[1].op, Op::Delete);
    assert_eq!(log[1].key, "k");
    assert!(log[1].value.is_empty());
    assert_eq!(log[0].value, b("v"));
    assert_eq!(log[0].token, l.token);
    assert_eq!(log[0].type_name, "T");
    let info = fx.hot.object_info(&l.object).await.expect("info").expect("exists");
    assert_eq!((info.keys, info.value_bytes), (0, 0));
}

/// An empty batch applies nothing and assigns no sequence number.
pub async fn empty_batch_assigns_no_sequence(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let r = fx.hot.write(&l.object, l.token, WriteBatch::new("T")).await.expect("empty batch");
    assert_eq!((r.first_seq, r.last_seq), (1, 0));
    fx.hot.put(&l.object, l.token, "T", "a", b("1")).await.expect("put");
    let r = fx.hot.write(&l.object, l.token, WriteBatch::new("T")).await.expect("empty batch");
    assert_eq!((r.first_seq, r.last_seq), (2, 1));
    assert_eq!(fx.hot.read_changes(&l.object, 0, 10).await.expect("log").len(), 1);
}

/// A batch with one invalid operation changes nothing.
pub async fn batch_is_atomic_when_one_op_is_invalid(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let bad = WriteBatch::new("T").put("a", b("1")).put("b", vec![0u8; MAX_VALUE_BYTES + 1]);
    let e = fx.hot.write(&l.object, l.token, bad).await.expect_err("oversized value");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    assert_eq!(fx.hot.get(&l.object, "a").await.expect("get"), None);
    assert!(fx.hot.read_changes(&l.object, 0, 10).await.expect("log").is_empty());
    let r = fx.hot.put(&l.object, l.token, "T", "a", b("1")).await.expect("put");
    assert_eq!(r.first_seq, 1, "a failed batch must not consume sequence numbers");
}

/// Values of exactly 2 MiB are stored; one byte more is `LimitExceeded`.
pub async fn value_at_limit_is_accepted_and_over_limit_rejected(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let big: Vec<u8> = (0..MAX_VALUE_BYTES).map(|i| (i % 251) as u8).collect();
    fx.hot.put(&l.object, l.token, "T", "big", Bytes::from(big.clone())).await.expect("2 MiB value");
    assert_eq!(fx.hot.get(&l.object, "big").await.expect("get").as_deref(), Some(&big[..]));
    let e = fx
        .hot
        .put(&l.object, l.token, "T", "big2", Bytes::from(vec![1u8; MAX_VALUE_BYTES + 1]))
        .await
        .expect_err("too big");
    match e.kind() {
        ErrorKind::LimitExceeded { limit, actual, .. } => {
            assert_eq!(*limit, MAX_VALUE_BYTES as u64);
            assert_eq!(*actual, MAX_VALUE_BYTES as u64 + 1);
        }
        other => panic!("expected LimitExceeded, got {other:?}"),
    }
    // A batch of values each within the limit, more than `WriteBatch::MAX_BYTES` together:
    // refused whole.
    let value = Bytes::from(big);
    let n = WriteBatch::MAX_BYTES / MAX_VALUE_BYTES + 1;
    let batch = (0..n).fold(WriteBatch::new("T"), |b, i| b.put(format!("many-{i}"), value.clone()));
    let e = fx.hot.write(&l.object, l.token, batch).await.expect_err("a batch over the byte limit");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    assert_eq!(fx.hot.get(&l.object, "many-0").await.expect("get"), None, "nothing of it written");
    // Two values fewer, just under the byte limit with their keys (62 MiB): accepted whole, in
    // one call (a backend whose requests or transactions cap below the limit fails here).
    let under = n - 2;
    let batch = (0..under).fold(WriteBatch::new("T"), |b, i| b.put(format!("most-{i:02}"), value.clone()));
    let r = fx.hot.write(&l.object, l.token, batch).await.expect("a batch just under the byte limit");
    assert_eq!(r.last_seq + 1 - r.first_seq, under as u64);
    for i in [0, under / 2, under - 1] {
        let got = fx.hot.get(&l.object, &format!("most-{i:02}")).await.expect("get");
        assert!(got.as_ref() == Some(&value), "most-{i:02}: {:?} bytes", got.map(|v| v.len()));
    }
    let empty = fx.hot.put(&l.object, l.token, "T", "empty", Bytes::new()).await.expect("an empty value is valid");
    assert_eq!(fx.hot.get(&l.object, "empty").await.expect("get"), Some(Bytes::new()));
    // Logged as a put of nothing, not taken for a delete (whose value is empty too).
    let log = fx.hot.read_changes(&l.object, empty.first_seq - 1, 1).await.expect("the empty put's change");
    let logged: Vec<_> = log.iter().map(|c| (c.seq, c.key.as_str(), c.op, c.value.len())).collect();
    assert_eq!(logged, [(empty.first_seq, "empty", Op::Put, 0)]);
}

/// Empty keys, keys with control characters and bad type names are `InvalidInput`.
pub async fn invalid_keys_and_type_names_are_rejected(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    for key in ["", "a\0b", "line\nbreak"] {
        let e = fx.hot.put(&l.object, l.token, "T", key, b("v")).await.expect_err(key);
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{key:?}: {e}");
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    }
    let e = fx.hot.put(&l.object, l.token, "", "k", b("v")).await.expect_err("empty type");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let e =
        fx.hot.put(&l.object, l.token, "T", &"k".repeat(crate::MAX_KEY_BYTES + 1), b("v")).await.expect_err("long key");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }));
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    // Reads check keys as writes do: a driver that cuts text at a NUL answered "a\0b" with
    // the value of "a".
    fx.hot.put(&l.object, l.token, "T", "a", b("a")).await.expect("put");
    for key in ["", "a\0b", "line\nbreak"] {
        let e = fx.hot.get(&l.object, key).await.expect_err(key);
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "get {key:?}: {e}");
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    }
    let e = fx.hot.get(&l.object, &"k".repeat(crate::MAX_KEY_BYTES + 1)).await.expect_err("get long key");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    // Unicode keys are fine and round-trip.
    fx.hot.put(&l.object, l.token, "T", "clé/日本", b("u")).await.expect("unicode key");
    assert_eq!(fx.hot.get(&l.object, "clé/日本").await.expect("get"), Some(b("u")));
}

/// Listing honours prefixes, ranges, limits and key order, and skips deleted keys.
pub async fn list_by_prefix_range_and_limit(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let mut batch = WriteBatch::new("T");
    for k in ["user/b", "user/a", "user/c", "userx", "use", "order/1", "user/d"] {
        batch = batch.put(k, b(k));
    }
    fx.hot.write(&l.object, l.token, batch.delete("user/d")).await.expect("batch");
    let keys = |v: Vec<crate::Entry>| v.into_iter().map(|e| e.key).collect::<Vec<_>>();
    let all = fx.hot.list(&l.object, KeyRange::all(), None).await.expect("list");
    assert_eq!(keys(all.clone()), ["order/1", "use", "user/a", "user/b", "user/c", "userx"]);
    assert_eq!(all[2].value, b("user/a"));
    assert!(all.iter().all(|e| e.seq >= 1));
    assert_eq!(
        keys(fx.hot.list(&l.object, KeyRange::prefix("user/"), None).await.expect("prefix")),
        ["user/a", "user/b", "user/c"]
    );
    assert_eq!(
        keys(fx.hot.list(&l.object, KeyRange::prefix("user/"), Some(2)).await.expect("limit")),
        ["user/a", "user/b"]
    );
    assert_eq!(
        keys(fx.hot.list(&l.object, KeyRange::between("use", "user/b"), None).await.expect("range")),
        ["use", "user/a"]
    );
    assert!(fx.hot.list(&l.object, KeyRange::prefix("zzz"), None).await.expect("none").is_empty());
    assert!(fx.hot.list(&l.object, KeyRange::all(), Some(0)).await.expect("limit 0").is_empty());
    // Inverted and degenerate ranges select nothing (and never panic).
    use std::ops::Bound::{Excluded, Included};
    for range in [
        KeyRange::between("user/c", "user/a"),
        KeyRange::between("user/a", "user/a"),
        KeyRange { start: Excluded("user/a".into()), end: Excluded("user/a".into()) },
        KeyRange { start: Excluded("user/a".into()), end: Included("user/a".into()) },
    ] {
        assert!(range.is_empty());
        assert!(fx.hot.list(&l.object, range.clone(), None).await.expect("empty range").is_empty(), "{range:?}");
    }
    let one = KeyRange { start: Included("user/a".into()), end: Included("user/a".into()) };
    assert!(!one.is_empty());
    assert_eq!(keys(fx.hot.list(&l.object, one, None).await.expect("one key")), ["user/a"]);
}

/// Ranges with an open or exclusive end on a non-empty selection, and a limit applied after
/// deleted keys are left out (a backend that limits first returns too few).
pub async fn list_honours_open_and_exclusive_bounds(f: &HotFactory) {
    use std::ops::Bound::{Excluded, Included, Unbounded};
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let batch = ["user/b", "user/a", "user/c", "userx", "use", "order/1"]
        .into_iter()
        .fold(WriteBatch::new("T"), |batch, k| batch.put(k, b(k)));
    fx.hot.write(&l.object, l.token, batch).await.expect("batch");
    fx.hot.delete(&l.object, l.token, "T", "user/a").await.expect("delete");
    let list = |start, end, limit| {
        let fx = &fx;
        let o = l.object.clone();
        async move {
            let range = KeyRange { start, end };
            let v = fx.hot.list(&o, range.clone(), limit).await.expect("list");
            (range, v.into_iter().map(|e| e.key).collect::<Vec<_>>())
        }
    };
    let s = |k: &str| k.to_string();
    for (start, end, limit, want) in [
        (Excluded(s("user/b")), Unbounded, None, vec!["user/c", "userx"]),
        (Excluded(s("use")), Unbounded, None, vec!["user/b", "user/c", "userx"]),
        (Unbounded, Included(s("use")), None, vec!["order/1", "use"]),
        (Unbounded, Excluded(s("use")), None, vec!["order/1"]),
        (Excluded(s("order/1")), Excluded(s("userx")), None, vec!["use", "user/b", "user/c"]),
        (Included(s("user/")), Excluded(s("user0")), Some(2), vec!["user/b", "user/c"]),
        (Unbounded, Unbounded, Some(3), vec!["order/1", "use", "user/b"]),
        (Excluded(s("user/a")), Unbounded, Some(1), vec!["user/b"]),
    ] {
        let (range, got) = list(start, end, limit).await;
        assert_eq!(got, want, "{range:?} limit {limit:?}");
    }
    let prefixed = fx.hot.list(&l.object, KeyRange::prefix("user/"), Some(2)).await.expect("prefix");
    assert_eq!(prefixed.into_iter().map(|e| e.key).collect::<Vec<_>>(), ["user/b", "user/c"], "deleted user/a");
}

/// Limits count bytes, not characters, and type names are checked on every write: a key of
/// 513 two-byte characters (1,026 bytes) is over the limit, a type name over 256 bytes or with
/// a control character is `InvalidInput`, and nothing of a refused write is applied.
pub async fn limits_count_bytes_and_type_names_are_checked(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let wide = "é".repeat(crate::MAX_KEY_BYTES / 2 + 1);
    let e = fx.hot.put(&l.object, l.token, "T", &wide, b("v")).await.expect_err("key over the limit in bytes");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let long_type = "T".repeat(crate::MAX_TYPE_NAME_BYTES + 1);
    let wide_type = "é".repeat(crate::MAX_TYPE_NAME_BYTES / 2 + 1);
    for type_name in [long_type.as_str(), wide_type.as_str(), "T\n", "T\u{7}"] {
        let e = fx.hot.put(&l.object, l.token, type_name, "k", b("v")).await.expect_err("bad type name");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{type_name:?}: {e}");
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
        let batch = WriteBatch::new(type_name).put("k", b("v")).delete("j");
        let e = fx.hot.write(&l.object, l.token, batch).await.expect_err("bad type name in a batch");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{type_name:?}: {e}");
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    }
    assert_eq!(fx.hot.get(&l.object, "k").await.expect("get"), None);
    assert_eq!(fx.hot.object_info(&l.object).await.expect("info").map_or(0, |i| i.last_seq), 0, "nothing logged");
    // More operations than one batch may hold: `LimitExceeded` naming the count, nothing written.
    let many = (0..=WriteBatch::MAX_OPS).fold(WriteBatch::new("T"), |b, _| b.delete("k"));
    let e = fx.hot.write(&l.object, l.token, many).await.expect_err("over MAX_OPS");
    assert!(
        matches!(e.kind(), ErrorKind::LimitExceeded { limit, actual, .. }
            if *limit == WriteBatch::MAX_OPS as u64 && *actual == WriteBatch::MAX_OPS as u64 + 1),
        "{e}"
    );
    assert_eq!(fx.hot.object_info(&l.object).await.expect("info").map_or(0, |i| i.last_seq), 0, "nothing logged");
    let at_limit = "T".repeat(crate::MAX_TYPE_NAME_BYTES);
    let r = fx.hot.put(&l.object, l.token, &at_limit, "k", b("v")).await.expect("a type name at the limit");
    assert_eq!(r.first_seq, 1);
}

/// An object that was never written reads as empty, not as an error.
pub async fn unknown_object_reads_empty(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let o = oid("never-written");
    assert_eq!(fx.hot.get(&o, "k").await.expect("get"), None);
    assert!(fx.hot.list(&o, KeyRange::all(), None).await.expect("list").is_empty());
    assert!(fx.hot.read_changes(&o, 0, 10).await.expect("log").is_empty());
    assert_eq!(fx.hot.object_info(&o).await.expect("info"), None);
    assert!(fx.guard.is_available(&o).await.expect("available"));
    assert_eq!(fx.guard.current(&o).await.expect("current"), None);
    // Leased, never written: there is no change to truncate through 1.
    let l = lease(&fx, "leased-only", "n1").await;
    let e = fx.hot.truncate_changes(&l.object, l.token, 1).await.expect_err("beyond the last sequence number, 0");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    fx.hot.truncate_changes(&l.object, l.token, 0).await.expect("through 0: nothing to do");
    let r = fx.hot.put(&l.object, l.token, "T", "k", b("v")).await.expect("put");
    assert_eq!(r.first_seq, 1, "a refused truncation changes no sequence number");
}

/// Sequence numbers are per object, start at 1 and have no gaps across batches.
pub async fn sequence_numbers_are_contiguous_across_batches(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l1 = lease(&fx, "o1", "n1").await;
    let l2 = lease(&fx, "o2", "n1").await;
    let r = fx
        .hot
        .write(&l1.object, l1.token, WriteBatch::new("T").put("a", b("1")).put("b", b("2")).delete("a"))
        .await
        .expect("w");
    assert_eq!((r.first_seq, r.last_seq), (1, 3));
    let r = fx.hot.put(&l2.object, l2.token, "T", "a", b("x")).await.expect("w");
    assert_eq!((r.first_seq, r.last_seq), (1, 1), "sequence numbers are per object");
    let r = fx.hot.put(&l1.object, l1.token, "T", "c", b("3")).await.expect("w");
    assert_eq!((r.first_seq, r.last_seq), (4, 4));
    let seqs: Vec<u64> = changes(&*fx.hot, &l1.object, 0, 100).await.expect("log").iter().map(|c| c.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
}

/// A large batch (hundreds of ops: long runs of puts, repeated keys, deletes in between, as
/// backends may apply runs of puts several rows per statement) gives exactly the state and the
/// change log of applying its ops one by one.
pub async fn large_mixed_batch_matches_one_by_one(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    fx.hot.put(&l.object, l.token, "T", "k003", b("before")).await.expect("put");
    let mut batch = WriteBatch::new("Big");
    let mut model: BTreeMap<String, Bytes> = BTreeMap::from([("k003".to_string(), b("before"))]);
    let mut expected: Vec<(String, Op, Bytes)> = Vec::new();
    for i in 0..300u32 {
        // Keys repeat every 41 ops, so one run of puts overwrites its own keys.
        let key = format!("k{:03}", (i * 7) % 41);
        if i % 37 == 36 || i % 101 == 5 {
            batch = batch.delete(key.clone());
            model.remove(&key);
            expected.push((key, Op::Delete, Bytes::new()));
        } else {
            let v = Bytes::from(format!("v{i}"));
            batch = batch.put(key.clone(), v.clone());
            model.insert(key.clone(), v.clone());
            expected.push((key, Op::Put, v));
        }
    }
    let r = fx.hot.write(&l.object, l.token, batch).await.expect("large batch");
    assert_eq!((r.first_seq, r.last_seq), (2, 301));
    let state = fx.hot.list(&l.object, KeyRange::all(), None).await.expect("list");
    let got: BTreeMap<String, Bytes> = state.iter().map(|e| (e.key.clone(), e.value.clone())).collect();
    assert_eq!(got, model, "state after the batch");
    for e in &state {
        let last = expected.iter().rposition(|(k, _, _)| *k == e.key).map_or(1, |p| p as u64 + 2);
        assert_eq!(e.seq, last, "seq of {}", e.key);
    }
    let log = changes(&*fx.hot, &l.object, 1, 1000).await.expect("log");
    let logged: Vec<(String, Op, Bytes)> = log.iter().map(|c| (c.key.clone(), c.op, c.value.clone())).collect();
    assert_eq!(logged, expected, "change log of the batch, in order");
    assert!(log.iter().enumerate().all(|(i, c)| c.seq == i as u64 + 2 && c.type_name == "Big" && c.token == l.token));
}

/// A batch that puts the same few keys again and again, a few ops apart (as a counter object
/// does), with deletes between, gives exactly the state and change log of its ops one by one:
/// a backend writing runs of puts several rows per statement applies a key repeated within
/// one statement in order (the large batch repeats its keys only every 41 ops).
pub async fn a_batch_repeating_keys_a_few_ops_apart_applies_them_in_order(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let mut batch = WriteBatch::new("Counter");
    let mut model: BTreeMap<String, (Bytes, u64)> = BTreeMap::new();
    let mut expected: Vec<(String, Op, Bytes)> = Vec::new();
    for i in 0..80u64 {
        let key = format!("c{}", i % 8);
        let seq = i + 1;
        if i % 13 == 12 {
            batch = batch.delete(key.clone());
            model.remove(&key);
            expected.push((key, Op::Delete, Bytes::new()));
        } else {
            let v = Bytes::from(format!("v{i}"));
            batch = batch.put(key.clone(), v.clone());
            model.insert(key.clone(), (v.clone(), seq));
            expected.push((key, Op::Put, v));
        }
    }
    let r = fx.hot.write(&l.object, l.token, batch).await.expect("batch");
    assert_eq!((r.first_seq, r.last_seq), (1, 80));
    let state = fx.hot.list(&l.object, KeyRange::all(), None).await.expect("list");
    let got: BTreeMap<String, (Bytes, u64)> = state.iter().map(|e| (e.key.clone(), (e.value.clone(), e.seq))).collect();
    assert_eq!(got, model, "each key's last value and the seq of its last put");
    let log = changes(&*fx.hot, &l.object, 0, 1000).await.expect("log");
    let logged: Vec<(String, Op, Bytes)> = log.iter().map(|c| (c.key.clone(), c.op, c.value.clone())).collect();
    assert_eq!(logged, expected, "change log of the batch, in order");
    assert!(log.iter().enumerate().all(|(i, c)| c.seq == i as u64 + 1));
}

/// The change log reads after a sequence number with a limit, and truncation drops a prefix.
pub async fn change_log_reads_and_truncates(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    for i in 0..10 {
        fx.hot.put(&l.object, l.token, "T", &format!("k{i}"), b(&i.to_string())).await.expect("put");
    }
    let page = changes(&*fx.hot, &l.object, 3, 4).await.expect("page");
    assert_eq!(page.iter().map(|c| c.seq).collect::<Vec<_>>(), [4, 5, 6, 7]);
    assert!(fx.hot.read_changes(&l.object, 0, 0).await.expect("limit 0").is_empty(), "at most `limit`: none");
    assert_eq!(page[0].key, "k3");
    assert_eq!(page[0].object, l.object);
    fx.hot.truncate_changes(&l.object, l.token, 6).await.expect("truncate");
    fx.hot.truncate_changes(&l.object, l.token, 6).await.expect("truncate is idempotent");
    fx.hot.truncate_changes(&l.object, l.token, 2).await.expect("truncating less is a no-op");
    let rest = changes(&*fx.hot, &l.object, 0, 100).await.expect("rest");
    assert_eq!(rest.iter().map(|c| c.seq).collect::<Vec<_>>(), [7, 8, 9, 10]);
    let info = fx.hot.object_info(&l.object).await.expect("info").expect("exists");
    assert_eq!((info.last_seq, info.truncated_through), (10, 6));
    assert!(info.has_pending_changes());
    let e = fx.hot.truncate_changes(&l.object, l.token, 11).await.expect_err("beyond last");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    assert!(e.to_string().contains("10"), "names the last seq: {e}");
    // The refused truncation changed nothing: the changes it would have dropped are still there.
    let rest = changes(&*fx.hot, &l.object, 0, 100).await.expect("rest");
    assert_eq!(rest.iter().map(|c| c.seq).collect::<Vec<_>>(), [7, 8, 9, 10], "nothing truncated");
    let info = fx.hot.object_info(&l.object).await.expect("info").expect("exists");
    assert_eq!((info.last_seq, info.truncated_through), (10, 6), "nothing truncated");
    assert_eq!(fx.hot.objects_with_pending_changes(None, 10).await.expect("pending"), std::slice::from_ref(&l.object));
    // State is untouched by truncation.
    assert_eq!(fx.hot.get(&l.object, "k0").await.expect("get"), Some(b("0")));
    fx.hot.truncate_changes(&l.object, l.token, 10).await.expect("truncate all");
    assert!(!fx.hot.object_info(&l.object).await.expect("info").expect("exists").has_pending_changes());
    // At the last sequence number there is: beyond it is still `InvalidInput` naming it.
    fx.hot.restore(&l.object, l.token, Vec::new(), crate::MAX_SEQ).await.expect("restore at MAX_SEQ");
    fx.hot.truncate_changes(&l.object, l.token, crate::MAX_SEQ).await.expect("truncate through MAX_SEQ");
    let e = fx.hot.truncate_changes(&l.object, l.token, crate::MAX_SEQ + 1).await.expect_err("beyond MAX_SEQ");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    assert!(e.to_string().contains(&crate::MAX_SEQ.to_string()), "names the last seq: {e}");
}

/// `read_changes` may answer with fewer changes than asked while more exist (a backend may
/// bound an answer's bytes), but never with none: reading on after the last change returned
/// until an empty answer gives every change once, in order, also when values of the largest
/// size (alone, two in one batch, next to small and empty ones) fill the answers; and a limit
/// of 1 gives the next change, however large. (A backend that cuts an answer by bytes before
/// its first change answers empty while changes remain, and the drain stops.)
pub async fn change_reads_page_through_values_at_the_limit(f: &HotFactory) {
    use crate::record::WriteOp;
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let big = |fill: u8| Bytes::from(vec![fill; MAX_VALUE_BYTES]);
    // Six values of the largest size (12 MiB in all) among small ones.
    let batches = [
        WriteBatch::new("T").put("s0", b("small")),
        WriteBatch::new("T").put("b0", big(1)),
        WriteBatch::new("T").put("s1", b("x")).put("b1", big(2)).put("s2", Bytes::new()),
        WriteBatch::new("T").put("b2", big(3)),
        WriteBatch::new("T").put("b3", big(4)).put("s3", b("y")).put("b4", big(5)),
        WriteBatch::new("T").delete("s0"),
        WriteBatch::new("T").put("s4", b("z")),
        WriteBatch::new("T").put("b5", big(6)),
        WriteBatch::new("T").put("s5", b("last")),
    ];
    let mut want: Vec<(u64, String, Bytes, Op)> = Vec::new();
    for batch in batches {
        let ops = batch.ops.clone();
        let r = fx.hot.write(&l.object, l.token, batch).await.expect("write");
        for (i, op) in ops.into_iter().enumerate() {
            let (key, value, op) = match op {
                WriteOp::Put { key, value } => (key, value, Op::Put),
                WriteOp::Delete { key } => (key, Bytes::new(), Op::Delete),
            };
            want.push((r.first_seq + i as u64, key, value, op));
        }
    }
    let last_seq = want.len() as u64;
    assert_eq!(want.iter().map(|w| w.0).collect::<Vec<_>>(), (1..=last_seq).collect::<Vec<_>>());
    // Compared by sequence number, key, operation, size and first byte (a failure must not
    // print 12 MiB), then byte for byte.
    let summary = |v: &[(u64, String, Bytes, Op)]| -> Vec<(u64, String, Op, usize, Option<u8>)> {
        v.iter().map(|(s, k, v, op)| (*s, k.clone(), *op, v.len(), v.first().copied())).collect()
    };
    for start in [0u64, 2] {
        let (mut after, mut got, mut pages) = (start, Vec::new(), 0u32);
        loop {
            let page = fx.hot.read_changes(&l.object, after, 1000).await.expect("read changes");
            let Some(last) = page.last() else { break };
            assert_eq!(page[0].seq, after + 1, "a page starts right after the last change read");
            after = last.seq;
            pages += 1;
            got.extend(page.into_iter().map(|c| (c.seq, c.key, c.value, c.op)));
        }
        let expected = &want[start as usize..];
        assert_eq!(summary(&got[..]), summary(expected), "paging from {start} ({pages} pages)");
        assert!(got.iter().zip(expected).all(|(g, w)| g.2 == w.2), "paging from {start}: a value differs");
    }
    for after in [0u64, 1, 2, 3, 5, last_seq - 2] {
        let page = fx.hot.read_changes(&l.object, after, 1).await.expect("read one change");
        let got: Vec<(u64, String, Bytes, Op)> = page.into_iter().map(|c| (c.seq, c.key, c.value, c.op)).collect();
        let expected = &want[after as usize..after as usize + 1];
        assert_eq!(summary(&got[..]), summary(expected), "the change after {after}, with a limit of 1");
    }
    assert!(fx.hot.read_changes(&l.object, last_seq, 1000).await.expect("read at the end").is_empty());
}

/// An object of more than 14 MiB (2 000 keys of 1 KiB, then six values of the largest size) lists
/// whole, in key order, also with a limit and over a sub-range, and its change log drains whole:
/// a backend whose answers have a size limit (a remote primary's) must page them. Listings that
/// run while batches keep rewriting its first and last keys together see both from one batch
/// (the pages of one listing are one snapshot).
pub async fn large_objects_list_and_drain_whole(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    const SMALL: usize = 2_000;
    let pad = |i: usize| {
        let k = format!("k{i:05}-");
        let fill = crate::MAX_KEY_BYTES - k.len();
        k + &"x".repeat(fill)
    };
    let big = |j: u8| Bytes::from(vec![j; MAX_VALUE_BYTES]);
    let mut want: Vec<(String, Bytes)> = vec![("a-first".into(), Bytes::new())];
    // Empty values before them: four of the large ones come to exactly 8 MiB of values, beside 2 MiB
    // of keys (a remote answer bounded by its values alone passes sqld's 10 MB).
    want.extend((0..SMALL).map(|i| (pad(i), Bytes::new())));
    want.extend((0..6u8).map(|j| (format!("m-big-{j}"), big(j))));
    want.push(("zz-last".into(), Bytes::new()));
    let batch = want.iter().fold(WriteBatch::new("T"), |b, (k, v)| b.put(k.clone(), v.clone()));
    let r = fx.hot.write(&l.object, l.token, batch).await.expect("write a large object");
    assert_eq!((r.first_seq, r.last_seq), (1, want.len() as u64));
    // Compared by key, size and first byte (a failure must not print 20 MiB), then byte for byte.
    let same = |got: &[crate::Entry], want: &[(String, Bytes)], what: &str| {
        let keys = |k: &str| if k.len() > 40 { format!("{}…", &k[..8]) } else { k.to_string() };
        let g: Vec<_> = got.iter().map(|e| (keys(&e.key), e.value.len(), e.value.first().copied())).collect();
        let w: Vec<_> = want.iter().map(|(k, v)| (keys(k), v.len(), v.first().copied())).collect();
        assert_eq!(g.len(), w.len(), "{what}: entries listed");
        assert!(g == w, "{what}: the listing differs in keys or sizes");
        for (e, (k, v)) in got.iter().zip(want) {
            assert!(&e.key == k && e.value == v, "{what}: {} differs", keys(k));
        }
    };
    let all = fx.hot.list(&l.object, KeyRange::all(), None).await.expect("list a large object");
    same(&all, &want, "everything");
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=want.len() as u64).collect::<Vec<_>>());
    let limited = fx.hot.list(&l.object, KeyRange::all(), Some(SMALL + 3)).await.expect("list with a limit");
    same(&limited, &want[..SMALL + 3], "with a limit");
    let sub = fx.hot.list(&l.object, KeyRange::between(pad(1_000), "m-big-4"), None).await.expect("list a range");
    same(&sub, &want[1_001..SMALL + 5], "a sub-range");
    let log = changes(&*fx.hot, &l.object, 0, usize::MAX).await.expect("drain the change log");
    let logged: Vec<(String, Bytes)> = log.iter().map(|c| (c.key.clone(), c.value.clone())).collect();
    assert!(logged == want, "the change log differs ({} changes of {})", logged.len(), want.len());
    assert_eq!(log.iter().map(|c| c.seq).collect::<Vec<_>>(), (1..=want.len() as u64).collect::<Vec<_>>());

    // Listings while batches rewrite the first and last keys together.
    const ROUNDS: u64 = 6;
    let rounds = Rounds::default();
    let writer = {
        let (hot, l, rounds) = (fx.hot.clone(), l.clone(), rounds.clone());
        tokio::spawn(async move {
            for i in 1..=ROUNDS {
                let v = Bytes::from(format!("v{i}"));
                hot.write(&l.object, l.token, WriteBatch::new("T").put("a-first", v.clone()).put("zz-last", v))
                    .await
                    .expect("write");
                if i % 3 == 0 {
                    rounds.wait_for_a_whole_round().await;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let mut reads = 0u32;
    loop {
        let finished = writer.is_finished();
        let listed = fx.hot.list(&l.object, KeyRange::all(), None).await.expect("list");
        assert_eq!(listed.len(), want.len(), "read {reads}");
        let (first, last) = (&listed[0], &listed[want.len() - 1]);
        assert_eq!((first.key.as_str(), last.key.as_str()), ("a-first", "zz-last"));
        assert_eq!(first.value, last.value, "the first and last keys listed from different batches (read {reads})");
        reads += 1;
        rounds.done();
        if finished {
            break;
        }
    }
    writer.await.expect("writer");
}

/// Objects with untruncated changes are listed in id order, with paging.
pub async fn pending_objects_are_listed_until_truncated(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let mut leases = Vec::new();
    for o in ["c", "a", "b"] {
        let l = lease(&fx, o, "n1").await;
        fx.hot.put(&l.object, l.token, "T", "k", b("v")).await.expect("put");
        leases.push(l);
    }
    let ids = |v: Vec<crate::ObjectId>| v.into_iter().map(|o| o.to_string()).collect::<Vec<_>>();
    assert_eq!(ids(fx.hot.objects_with_pending_changes(None, 10).await.expect("pending")), ["a", "b", "c"]);
    assert_eq!(ids(fx.hot.objects_with_pending_changes(Some(&oid("a")), 1).await.expect("page")), ["b"]);
    // Paging on from an id that is not (or no longer) pending: a drainer pages on from the last
    // object it drained, which it has truncated meanwhile.
    let after = |id: &str| {
        let fx = &fx;
        let id = oid(id);
        async move { ids(fx.hot.objects_with_pending_changes(Some(&id), 10).await.expect("page")) }
    };
    assert_eq!(after("a0").await, ["b", "c"], "after an id never written");
    assert_eq!(after("zz").await, Vec::<String>::new(), "after every pending id");
    let lb = &leases[2];
    fx.hot.truncate_changes(&lb.object, lb.token, 1).await.expect("truncate b");
    assert_eq!(ids(fx.hot.objects_with_pending_changes(None, 10).await.expect("pending")), ["a", "c"]);
    assert_eq!(after("b").await, ["c"], "after an object drained meanwhile");
    assert_eq!(after("a0").await, ["c"]);
    assert_eq!(after("a").await, ["c"]);
    for other in [&leases[0], &leases[1]] {
        let log = fx.hot.read_changes(&other.object, 0, 10).await.expect("log");
        assert_eq!(log.len(), 1, "truncating b left {}'s change log alone", other.object);
    }
}

/// Token `NONE` is never accepted.
pub async fn none_token_is_rejected(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let e = fx.hot.put(&oid("o1"), FencingToken::NONE, "T", "k", b("v")).await.expect_err("NONE token");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    assert_eq!(fx.hot.get(&oid("o1"), "k").await.expect("get"), None);
}

/// Tokens above `FencingToken::MAX` are never accepted; once a write has used `MAX` itself, no
/// further lease can be issued (`LimitExceeded`): a token is never issued twice.
pub async fn tokens_are_bounded_and_never_shared_at_the_bound(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let o = oid("o1");
    for bad in [FencingToken::new(FencingToken::MAX.get() + 1), FencingToken::new(u64::MAX)] {
        let e = fx.hot.put(&o, bad, "T", "k", b("v")).await.expect_err("token above MAX");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{bad}: {e}");
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
        let e = fx.hot.truncate_changes(&o, bad, 0).await.expect_err("token above MAX");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{bad}: {e}");
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
        let e = fx.hot.write(&o, bad, WriteBatch::new("T")).await.expect_err("empty batch, token above MAX");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{bad}: {e}");
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
        let e = fx.hot.evict(&o, bad).await.expect_err("evict, token above MAX");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{bad}: {e}");
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
        let e = fx.hot.restore(&o, bad, vec![], 1).await.expect_err("restore, token above MAX");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{bad}: {e}");
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    }
    assert_eq!(fx.hot.object_info(&o).await.expect("info"), None, "nothing recorded for the object");
    assert_eq!(fx.hot.get(&o, "k").await.expect("get"), None);
    let l = lease(&fx, "o1", "n1").await;
    // A writer presenting MAX itself (the largest valid token) is accepted...
    fx.hot.put(&o, FencingToken::MAX, "T", "k", b("max")).await.expect("write with MAX");
    clock.advance(TTL + Duration::from_millis(1));
    // ...and then no lease can get a larger one.
    let e = fx.guard.acquire(&o, &nid("n2"), TTL).await.expect_err("no token left");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let e = fx.hot.put(&o, l.token, "T", "k", b("stale")).await.expect_err("stale");
    assert!(matches!(e.kind(), ErrorKind::Fenced { .. }), "{e}");
    assert_eq!(fx.hot.get(&o, "k").await.expect("get"), Some(b("max")));
    // The same when MAX came with an empty write to an object that has no state at all.
    let empty = oid("o2");
    fx.hot.write(&empty, FencingToken::MAX, WriteBatch::new("T")).await.expect("empty write with MAX");
    let e = fx.guard.acquire(&empty, &nid("n2"), TTL).await.expect_err("no token left");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
}

/// Sequence numbers end at `MAX_SEQ`: a restore beyond it is `InvalidInput`, and a write that
/// would pass it is `LimitExceeded` and writes nothing.
pub async fn sequence_numbers_are_bounded(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let e = fx.hot.restore(&l.object, l.token, Vec::new(), crate::MAX_SEQ + 1).await.expect_err("beyond MAX_SEQ");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let entry = crate::Entry { key: "k".into(), value: b("v"), seq: crate::MAX_SEQ - 1 };
    fx.hot.restore(&l.object, l.token, vec![entry], crate::MAX_SEQ - 1).await.expect("restore near the end");
    let two = WriteBatch::new("T").put("x", b("1")).put("y", b("2"));
    let e = fx.hot.write(&l.object, l.token, two).await.expect_err("a two-op batch would pass MAX_SEQ");
    // The sequence number the batch would have ended at (as `WriteReceipt` counts it).
    let over = ErrorKind::LimitExceeded { what: "sequence number", limit: crate::MAX_SEQ, actual: crate::MAX_SEQ + 1 };
    assert_eq!(e.kind(), &over, "{e}");
    assert_eq!(fx.hot.get(&l.object, "x").await.expect("get"), None, "nothing of the refused batch applied");
    let r = fx.hot.put(&l.object, l.token, "T", "a", b("1")).await.expect("the last sequence number");
    assert_eq!(r.last_seq, crate::MAX_SEQ);
    let e = fx.hot.put(&l.object, l.token, "T", "b", b("2")).await.expect_err("past MAX_SEQ");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    assert_eq!(fx.hot.get(&l.object, "b").await.expect("get"), None, "nothing of the refused write applied");
    assert_eq!(fx.hot.get(&l.object, "k").await.expect("get"), Some(b("v")));
    let log = fx.hot.read_changes(&l.object, 0, 10).await.expect("log");
    assert_eq!(log.iter().map(|c| c.seq).collect::<Vec<_>>(), [crate::MAX_SEQ]);
    // A newer token refused for room changes nothing either, its token included: the holder
    // is not fenced by a write that was refused.
    let newer = FencingToken::new(l.token.get() + 5);
    let e = fx.hot.put(&l.object, newer, "T", "c", b("3")).await.expect_err("past MAX_SEQ, newer token");
    assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    assert_eq!(fx.hot.get(&l.object, "c").await.expect("get"), None, "nothing of the refused write applied");
    let info = fx.hot.object_info(&l.object).await.expect("info").expect("object");
    assert_eq!(info.max_token, l.token, "the refused write did not raise the token");
    let r = fx.hot.write(&l.object, l.token, WriteBatch::new("T")).await.expect("the holder is not fenced");
    assert_eq!(r.last_seq, crate::MAX_SEQ);
}

/// After another holder takes over, a write with the old token is `Fenced` and changes nothing.
pub async fn stale_token_write_is_rejected_after_takeover(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let old = lease(&fx, "o1", "n1").await;
    fx.hot.put(&old.object, old.token, "T", "k", b("old")).await.expect("put");
    clock.advance(TTL + Duration::from_millis(1));
    let new = lease(&fx, "o1", "n2").await;
    assert!(new.token > old.token);
    fx.hot.put(&new.object, new.token, "T", "k", b("new")).await.expect("new holder writes");
    let e = fx.hot.put(&old.object, old.token, "T", "k", b("stale")).await.expect_err("stale write");
    match e.kind() {
        ErrorKind::Fenced { presented, current, object } => {
            assert_eq!(*presented, old.token);
            assert_eq!(*current, new.token);
            assert_eq!(object, &old.object);
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert!(!e.is_retryable());
    assert_eq!(fx.hot.get(&old.object, "k").await.expect("get"), Some(b("new")));
    let e = fx.hot.truncate_changes(&old.object, old.token, 1).await.expect_err("stale truncate");
    assert!(e.is_fenced());
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let e = fx.hot.evict(&old.object, old.token).await.expect_err("stale evict");
    assert!(e.is_fenced());
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    assert_eq!(changes(&*fx.hot, &old.object, 0, 10).await.expect("log").len(), 2);
}

/// A holder paused past its TTL is fenced as soon as the new holder's lease exists, even
/// before the new holder writes anything.
pub async fn paused_holder_past_ttl_is_fenced(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let a = lease(&fx, "o1", "a").await;
    fx.hot.put(&a.object, a.token, "T", "n", b("1")).await.expect("put");
    clock.advance(TTL * 2); // a "pauses"
    assert!(fx.guard.is_available(&a.object).await.expect("available"));
    let bl = lease(&fx, "o1", "b").await;
    let e = fx.hot.put(&a.object, a.token, "T", "n", b("2")).await.expect_err("paused holder");
    assert!(e.is_fenced(), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let e = fx.guard.validate(&a).await.expect_err("validate old");
    assert!(e.is_fenced(), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    fx.guard.validate(&bl).await.expect("new lease is valid");
    assert_eq!(fx.hot.get(&a.object, "n").await.expect("get"), Some(b("1")));
}

/// A write dropped after any number of polls (a caller's timeout around it) is whole or absent:
/// the change log has no gap, every dropped batch is in it whole or not at all, and the state is
/// the log's fold. (An async backend that gave a connection back with the dropped call's
/// transaction still open let the next write commit half a batch.) A dropped write already sent
/// may still land later (a remote primary): before the log is read, another node takes the
/// object over and writes, which fences any such late landing.
pub async fn a_write_dropped_midway_is_whole_or_absent(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    fx.hot.put(&l.object, l.token, "T", "gone", b("x")).await.expect("put");
    for polls in 1..=8u32 {
        let batch = WriteBatch::new("T")
            .put(format!("a{polls}"), b("1"))
            .put(format!("b{polls}"), b("2"))
            .delete("gone")
            .put(format!("c{polls}"), b("3"));
        {
            let mut write = std::pin::pin!(fx.hot.write(&l.object, l.token, batch));
            for _ in 0..polls {
                if futures::poll!(write.as_mut()).is_ready() {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        fx.hot
            .put(&l.object, l.token, "T", "after", b(&polls.to_string()))
            .await
            .expect("a write after the dropped one");
    }
    clock.advance(TTL + Duration::from_millis(1));
    let fence = lease(&fx, "o1", "n2").await;
    fx.hot.write(&fence.object, fence.token, WriteBatch::new("T")).await.expect("the new holder's token is the floor");
    let log = changes(&*fx.hot, &l.object, 0, usize::MAX).await.expect("log");
    let seqs: Vec<u64> = log.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=log.len() as u64).collect::<Vec<_>>(), "the log has no gaps: {seqs:?}");
    for polls in 1..=8u32 {
        let keys = [format!("a{polls}"), format!("b{polls}"), format!("c{polls}")];
        let present = keys.iter().filter(|k| log.iter().any(|r| &r.key == *k)).count();
        assert!(present == 0 || present == 3, "the batch dropped after {polls} polls is in the log in part");
    }
    let folded: BTreeMap<String, Bytes> =
        crate::cold::fold_changes(&log).0.into_iter().map(|e| (e.key, e.value)).collect();
    let state: BTreeMap<String, Bytes> = fx
        .hot
        .list(&l.object, KeyRange::all(), None)
        .await
        .expect("list")
        .into_iter()
        .map(|e| (e.key, e.value))
        .collect();
    assert_eq!(state, folded, "the state is the log's fold");
}

/// A newer lease keeps fencing the older holder after it ended (released, or run out) without
/// its holder writing anything: the store remembers every token the guard issued, not only the
/// leases in force. (A store whose floor counts only leases in force, or drops released lease
/// rows, accepted the old holder's writes once the newer lease was gone.) Each end and each kind
/// of call runs on an object of its own, written by the old holder or never written; `current`
/// is `None` once the newer lease has ended.
pub async fn a_newer_lease_keeps_fencing_after_it_ends(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    for end in ["released", "expired"] {
        for written in [true, false] {
            for call in ["put", "truncate", "evict", "restore"] {
                // Alphanumeric and lower case: ids sharing a prefix or differing in case are other cases' matter.
                let id = format!("{call}{end}{}", if written { "written" } else { "blank" });
                let old = lease(&fx, &id, "n1").await;
                if written {
                    fx.hot.put(&old.object, old.token, "T", "k", b("old")).await.expect("put");
                }
                clock.advance(TTL + Duration::from_millis(1));
                let new = lease(&fx, &id, "n2").await;
                assert!(new.token > old.token);
                if end == "released" {
                    fx.guard.release(&new).await.expect("release");
                } else {
                    clock.advance(TTL + Duration::from_millis(1));
                }
                assert_eq!(fx.guard.current(&old.object).await.expect("current"), None, "{id}: the newer lease {end}");
                let e = match call {
                    "put" => fx.hot.put(&old.object, old.token, "T", "k", b("stale")).await.map(|_| ()),
                    "truncate" => fx.hot.truncate_changes(&old.object, old.token, 0).await,
                    "evict" => fx.hot.evict(&old.object, old.token).await,
                    _ => {
                        let entry = crate::Entry { key: "k".into(), value: b("cold"), seq: 5 };
                        fx.hot.restore(&old.object, old.token, vec![entry], 5).await
                    }
                }
                .expect_err(&format!("{id}: a stale call after the newer lease {end}"));
                match e.kind() {
                    ErrorKind::Fenced { presented, current, .. } => {
                        assert_eq!((*presented, *current), (old.token, new.token), "{id}: {e}");
                    }
                    other => panic!("{id}: expected Fenced, got {other:?}: {e}"),
                }
                let value = if written { Some(b("old")) } else { None };
                assert_eq!(fx.hot.get(&old.object, "k").await.expect("get"), value, "{id}: nothing changed");
            }
        }
    }
}

/// A lease taken over before the object was ever written fences every call of the old holder:
/// the new lease alone is the object's fencing floor, before the new holder writes anything.
/// Each kind of call is tried on an object of its own, so that no refused call can have raised
/// the floor for the next one.
pub async fn takeover_fences_an_object_never_written(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let mut pairs = Vec::new();
    for id in ["put", "truncate", "evict", "restore"] {
        pairs.push(lease(&fx, id, "n1").await);
    }
    clock.advance(TTL + Duration::from_millis(1));
    let mut news = Vec::new();
    for old in &pairs {
        let new = lease(&fx, old.object.as_str(), "n2").await;
        assert!(new.token > old.token);
        news.push(new);
    }
    let stale = |e: crate::Error, old: &crate::Lease, new: &crate::Lease| match e.kind() {
        ErrorKind::Fenced { presented, current, .. } => {
            assert_eq!((*presented, *current), (old.token, new.token), "{e}");
        }
        other => panic!("expected Fenced for {}, got {other:?}", old.object),
    };
    let e = fx.hot.put(&pairs[0].object, pairs[0].token, "T", "k", b("stale")).await.expect_err("stale put");
    stale(e, &pairs[0], &news[0]);
    let e = fx.hot.truncate_changes(&pairs[1].object, pairs[1].token, 0).await.expect_err("stale truncate");
    stale(e, &pairs[1], &news[1]);
    let e = fx.hot.evict(&pairs[2].object, pairs[2].token).await.expect_err("stale evict");
    stale(e, &pairs[2], &news[2]);
    let entry = crate::Entry { key: "k".into(), value: b("cold"), seq: 1 };
    let e = fx.hot.restore(&pairs[3].object, pairs[3].token, vec![entry], 1).await.expect_err("stale restore");
    stale(e, &pairs[3], &news[3]);
    for (old, new) in pairs.iter().zip(&news) {
        assert_eq!(fx.hot.get(&old.object, "k").await.expect("get"), None, "{}", old.object);
        assert!(fx.hot.read_changes(&old.object, 0, 10).await.expect("log").is_empty());
        let r = fx.hot.put(&new.object, new.token, "T", "k", b("new")).await.expect("new holder writes");
        assert_eq!((r.first_seq, r.last_seq), (1, 1));
        let e = fx.hot.put(&old.object, old.token, "T", "k", b("stale")).await.expect_err("stale write");
        stale(e, old, new);
        let info = fx.hot.object_info(&new.object).await.expect("info").expect("written");
        assert_eq!(info.max_token, new.token);
        assert_eq!(fx.hot.get(&new.object, "k").await.expect("get"), Some(b("new")));
    }
}

/// Eviction needs every change truncated (acknowledged by cold) and keeps the sequence counter.
pub async fn evict_requires_drained_changes_and_keeps_sequence(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    fx.hot.write(&l.object, l.token, WriteBatch::new("T").put("a", b("1")).put("b", b("2"))).await.expect("w");
    let e = fx.hot.evict(&l.object, l.token).await.expect_err("undrained");
    assert_eq!(e.kind(), &ErrorKind::Conflict);
    assert_eq!(fx.hot.get(&l.object, "a").await.expect("get"), Some(b("1")), "failed evict keeps state");
    // Drained in part: still refused (the change above the truncation is cold storage's only
    // way to learn of `b`).
    fx.hot.truncate_changes(&l.object, l.token, 1).await.expect("truncate the first");
    let e = fx.hot.evict(&l.object, l.token).await.expect_err("one change undrained");
    assert_eq!(e.kind(), &ErrorKind::Conflict);
    assert_eq!(fx.hot.read_changes(&l.object, 1, 10).await.expect("log").len(), 1, "the pending change stays");
    fx.hot.truncate_changes(&l.object, l.token, 2).await.expect("truncate");
    fx.hot.evict(&l.object, l.token).await.expect("evict");
    assert_eq!(fx.hot.get(&l.object, "a").await.expect("get"), None);
    assert!(fx.hot.list(&l.object, KeyRange::all(), None).await.expect("list").is_empty());
    let info = fx.hot.object_info(&l.object).await.expect("info").expect("seq kept");
    assert_eq!((info.last_seq, info.keys), (2, 0));
    let r = fx.hot.put(&l.object, l.token, "T", "c", b("3")).await.expect("write after evict");
    assert_eq!(r.first_seq, 3, "sequence numbers never repeat");
}

/// Restore installs cold state without logging it and continues the sequence after it.
pub async fn restore_installs_state_and_continues_sequence(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let entries = vec![
        crate::Entry { key: "a".into(), value: b("1"), seq: 3 },
        crate::Entry { key: "b".into(), value: b("2"), seq: 7 },
    ];
    fx.hot.restore(&l.object, l.token, entries.clone(), 7).await.expect("restore");
    assert_eq!(fx.hot.list(&l.object, KeyRange::all(), None).await.expect("list"), entries);
    assert!(fx.hot.read_changes(&l.object, 0, 10).await.expect("log").is_empty());
    let info = fx.hot.object_info(&l.object).await.expect("info").expect("exists");
    assert_eq!((info.last_seq, info.truncated_through, info.keys), (7, 7, 2));
    let r = fx.hot.put(&l.object, l.token, "T", "c", b("3")).await.expect("put");
    assert_eq!(r.first_seq, 8);
    let e = fx.hot.restore(&l.object, l.token, vec![], 8).await.expect_err("pending changes");
    assert_eq!(e.kind(), &ErrorKind::Conflict);
    assert!(e.is_retryable(), "once the changes are drained the restore can succeed: {e}");
    // Pending changes and a sequence past the restore: no retry can make that succeed.
    let e = fx.hot.restore(&l.object, l.token, vec![], 6).await.expect_err("older than hot");
    assert_eq!(e.kind(), &ErrorKind::Conflict);
    assert!(!e.is_retryable(), "the hot sequence never goes back: {e}");
    fx.hot.truncate_changes(&l.object, l.token, 8).await.expect("truncate");
    let e = fx.hot.restore(&l.object, l.token, vec![], 5).await.expect_err("older than hot");
    assert_eq!(e.kind(), &ErrorKind::Conflict);
    assert!(!e.is_retryable(), "the hot sequence never goes back: {e}");
    assert_eq!(fx.hot.get(&l.object, "c").await.expect("get"), Some(b("3")));
}

/// What a hot backend made durable survives a reopen (a restart after a crash: the old handle is
/// never dropped, see [`crash`](super::crash)): live state, the sequence counter (also past a
/// truncation), the truncation point, the lease and the token maximum.
pub async fn state_sequence_and_tokens_survive_reopen(f: &super::HotReopenFactory) {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(KIT_EPOCH);
    let fx = f(clock.clone(), dir.path().to_path_buf()).await;
    let old = fx.guard.acquire(&oid("o1"), &nid("n1"), TTL).await.expect("acquire");
    fx.hot.write(&old.object, old.token, WriteBatch::new("T").put("a", b("1")).put("b", b("2"))).await.expect("w");
    fx.hot.delete(&old.object, old.token, "T", "b").await.expect("delete");
    fx.hot.truncate_changes(&old.object, old.token, 3).await.expect("truncate");
    fx.hot.put(&old.object, old.token, "T", "c", b("3")).await.expect("put");
    super::crash(fx);
    let fx = f(clock.clone(), dir.path().to_path_buf()).await;
    assert_eq!(fx.hot.get(&old.object, "a").await.expect("get"), Some(b("1")));
    assert_eq!(fx.hot.get(&old.object, "b").await.expect("get"), None);
    let info = fx.hot.object_info(&old.object).await.expect("info").expect("kept");
    assert_eq!((info.last_seq, info.truncated_through, info.keys), (4, 3, 2));
    let log = fx.hot.read_changes(&old.object, 0, 10).await.expect("log");
    assert_eq!(log.iter().map(|r| r.seq).collect::<Vec<_>>(), [4], "the untruncated change only");
    let e = fx.guard.acquire(&old.object, &nid("n2"), TTL).await.expect_err("the lease survived");
    assert!(matches!(e.kind(), ErrorKind::LeaseHeld { .. }), "{e}");
    clock.advance(TTL + Duration::from_millis(1));
    let new = fx.guard.acquire(&old.object, &nid("n2"), TTL).await.expect("acquire after expiry");
    assert!(new.token > old.token, "tokens never repeat across a restart");
    assert!(fx.hot.put(&old.object, old.token, "T", "a", b("stale")).await.expect_err("stale").is_fenced());
    assert_eq!(fx.hot.put(&new.object, new.token, "T", "d", b("4")).await.expect("put").first_seq, 5);
    super::crash(fx);
    let fx = f(clock.clone(), dir.path().to_path_buf()).await;
    assert!(fx.hot.put(&old.object, old.token, "T", "a", b("stale")).await.expect_err("still fenced").is_fenced());
    assert_eq!(fx.hot.object_info(&old.object).await.expect("info").expect("kept").max_token, new.token);
    // A lease released without any write: its token is not issued again after a restart either.
    let released = fx.guard.acquire(&oid("o2"), &nid("n1"), TTL).await.expect("acquire o2");
    fx.guard.release(&released).await.expect("release");
    super::crash(fx);
    let fx = f(clock.clone(), dir.path().to_path_buf()).await;
    let again = fx.guard.acquire(&oid("o2"), &nid("n2"), TTL).await.expect("acquire o2 again");
    assert!(again.token > released.token, "{again:?} after {released:?}");
    // An object whose log was drained whole, then evicted: its counter survives restarts (a
    // backend that derives it from the log, or from live state, starts over and reuses numbers).
    let d = fx.guard.acquire(&oid("o3"), &nid("n1"), TTL).await.expect("acquire o3");
    fx.hot.write(&d.object, d.token, WriteBatch::new("T").put("a", b("1")).put("b", b("2"))).await.expect("w");
    fx.hot.delete(&d.object, d.token, "T", "b").await.expect("delete");
    fx.hot.truncate_changes(&d.object, d.token, 3).await.expect("truncate all");
    super::crash(fx);
    let fx = f(clock.clone(), dir.path().to_path_buf()).await;
    let info = fx.hot.object_info(&d.object).await.expect("info").expect("kept");
    assert_eq!((info.last_seq, info.truncated_through, info.keys), (3, 3, 1), "drained log, after a restart");
    fx.hot.truncate_changes(&d.object, d.token, 3).await.expect("nothing pending");
    fx.hot.evict(&d.object, d.token).await.expect("evict");
    super::crash(fx);
    let fx = f(clock.clone(), dir.path().to_path_buf()).await;
    let info = fx.hot.object_info(&d.object).await.expect("info").expect("the counter is kept after evict");
    assert_eq!((info.last_seq, info.keys, info.resident), (3, 0, false), "evicted, after a restart");
    fx.hot
        .restore(&d.object, d.token, vec![crate::Entry { key: "a".into(), value: b("1"), seq: 1 }], 3)
        .await
        .expect("restore");
    super::crash(fx);
    let fx = f(clock.clone(), dir.path().to_path_buf()).await;
    assert_eq!(fx.hot.get(&d.object, "a").await.expect("get"), Some(b("1")), "restored state survives a restart");
    let info = fx.hot.object_info(&d.object).await.expect("info").expect("kept");
    assert!(info.resident, "restored, after a restart: {info:?}");
    assert_eq!(fx.hot.put(&d.object, d.token, "T", "c", b("3")).await.expect("put").first_seq, 4);
    // A lease acquired with nothing after it (no write, no release) survives a restart: an
    // acquire is durable when it answers, not once a later call flushes it.
    let held = fx.guard.acquire(&oid("o4"), &nid("n1"), TTL).await.expect("acquire o4");
    super::crash(fx);
    let fx = f(clock.clone(), dir.path().to_path_buf()).await;
    match fx.guard.acquire(&held.object, &nid("n2"), TTL).await {
        Err(e) if matches!(e.kind(), ErrorKind::LeaseHeld { holder, .. } if *holder == held.holder) => {}
        other => panic!("the lease acquired before the restart was lost: {other:?}"),
    }
    let current = fx.guard.current(&held.object).await.expect("current").map(|l| (l.holder, l.token));
    assert_eq!(current, Some((held.holder.clone(), held.token)), "the lease after the restart");
    clock.advance(TTL + Duration::from_millis(1));
    let next = fx.guard.acquire(&held.object, &nid("n2"), TTL).await.expect("acquire o4 after expiry");
    assert!(next.token > held.token, "{next:?} after {held:?}");
}

/// A lease released through a handle whose clock runs ahead is free at once through a handle
/// whose clock is behind (nodes' clocks are never exactly in step): a release that wrote the
/// releaser's time as the expiry left the object held, for the other node, for as long as the
/// clocks are apart. The released token is never issued again.
pub async fn a_release_frees_the_object_for_a_node_whose_clock_is_behind(f: &super::HotReopenFactory) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ahead, behind) = (ManualClock::new(KIT_EPOCH.plus(Duration::from_secs(5))), ManualClock::new(KIT_EPOCH));
    let h1 = f(ahead.clone(), dir.path().to_path_buf()).await;
    let h2 = f(behind.clone(), dir.path().to_path_buf()).await;
    let o = oid("skewed");
    let l1 = h1.guard.acquire(&o, &nid("ahead"), TTL).await.expect("acquire ahead");
    h1.guard.release(&l1).await.expect("release ahead");
    let l2 = h2.guard.acquire(&o, &nid("behind"), TTL).await.expect("free at once for the node behind");
    assert!(l2.token > l1.token, "{l2:?} after {l1:?}");
    h2.guard.release(&l2).await.expect("release behind");
    let l3 = h1.guard.acquire(&o, &nid("ahead"), TTL).await.expect("and for the node ahead");
    assert!(l3.token > l2.token, "{l3:?} after {l2:?}");
    // Released by the node ahead once its own clock saw the lease run out (a runtime giving back
    // a lease that outlived its call): the node behind, whose clock still sees it live, finds it
    // free all the same.
    ahead.advance(TTL + Duration::from_millis(1));
    h1.guard.release(&l3).await.expect("release of a lease run out by the releaser's clock");
    let l4 = h2.guard.acquire(&o, &nid("behind"), TTL).await.expect("free for the node behind");
    assert!(l4.token > l3.token, "{l4:?} after {l3:?}");
    h2.guard.release(&l4).await.expect("release behind");
    ahead.advance(TTL * 2);
    let l3 = h1.guard.acquire(&o, &nid("ahead"), TTL).await.expect("the node ahead again");
    // A release of an old lease does not end the current one.
    h2.guard.release(&l2).await.expect("a stale release");
    h1.guard.validate(&l3).await.expect("the current lease still holds");
}

/// A refresh is kept with the lease in the database, not in the handle that made it: another
/// handle sees the extended expiry (past the old one, an acquire there is `LeaseHeld` naming the
/// refreshed expiry and the lease validates), also after the refreshing handle crashed and the
/// database was opened again; once the refreshed lease runs out, the object is free.
pub async fn a_refresh_holds_across_handles_and_reopen(f: &super::HotReopenFactory) {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(KIT_EPOCH);
    let h1 = f(clock.clone(), dir.path().to_path_buf()).await;
    let h2 = f(clock.clone(), dir.path().to_path_buf()).await;
    let o = oid("refreshed");
    let l = h1.guard.acquire(&o, &nid("n1"), TTL).await.expect("acquire");
    clock.advance(TTL / 2);
    let r = h1.guard.refresh(&l, TTL).await.expect("refresh");
    clock.advance(TTL * 3 / 4); // past the lease's first expiry, before the refreshed one
    let held = |e: crate::Error, through: &str| match e.kind() {
        ErrorKind::LeaseHeld { holder, expires_at, .. } => {
            assert_eq!((holder, *expires_at), (&r.holder, r.expires_at), "{through}: {e}")
        }
        other => panic!("{through}: expected LeaseHeld, got {other:?}"),
    };
    held(h2.guard.acquire(&o, &nid("n2"), TTL).await.expect_err("still held"), "the other handle");
    h2.guard.validate(&r).await.expect("the refreshed lease validates through the other handle");
    super::crash(h1);
    let h3 = f(clock.clone(), dir.path().to_path_buf()).await;
    held(h3.guard.acquire(&o, &nid("n2"), TTL).await.expect_err("still held"), "a reopened handle");
    h3.hot.put(&o, r.token, "T", "k", b("v")).await.expect("the holder's token still writes");
    clock.advance(TTL / 4 + Duration::from_millis(1));
    let next = h2.guard.acquire(&o, &nid("n2"), TTL).await.expect("free once the refreshed lease ran out");
    assert!(next.token > r.token, "{next:?} after {r:?}");
}

/// Two handles open at once on one database race: of acquires made through both at once exactly
/// one is granted, and writes through both under that lease get every sequence number once (a
/// guard or counter that decides read-then-write under an in-process lock grants two, or hands
/// out one number twice, across handles).
pub async fn races_through_two_handles_have_one_winner_and_unique_sequences(f: &super::HotReopenFactory) {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(KIT_EPOCH);
    let h1 = std::sync::Arc::new(f(clock.clone(), dir.path().to_path_buf()).await);
    let h2 = std::sync::Arc::new(f(clock.clone(), dir.path().to_path_buf()).await);
    for round in 0..5 {
        let o = oid(&format!("race{round}"));
        // Acquires through both handles at once: exactly one is granted, the other is held.
        let tries: Vec<_> = (0..8)
            .map(|i| {
                let (h, o) = (if i % 2 == 0 { h1.clone() } else { h2.clone() }, o.clone());
                tokio::spawn(async move { h.guard.acquire(&o, &nid(&format!("n{i}")), TTL).await })
            })
            .collect();
        let mut granted = Vec::new();
        for t in tries {
            match t.await.expect("task") {
                Ok(l) => granted.push(l),
                Err(e) => assert!(
                    matches!(e.kind(), ErrorKind::LeaseHeld { .. }) || e.is_retryable(),
                    "round {round}: a lost race is LeaseHeld (or busy): {e}"
                ),
            }
        }
        assert_eq!(granted.len(), 1, "round {round}: one winner across the two handles: {granted:?}");
        let l = granted.remove(0);
        // Writes under that lease through both handles at once: every sequence number once.
        let writes: Vec<_> = (0..8)
            .map(|i| {
                let (h, l) = (if i % 2 == 0 { h1.clone() } else { h2.clone() }, l.clone());
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for j in 0..5 {
                        let key = format!("k{i}-{j}");
                        loop {
                            match h.hot.put(&l.object, l.token, "T", &key, b("v")).await {
                                Ok(r) => break seqs.push(r.first_seq),
                                Err(e) if e.is_retryable() => continue,
                                Err(e) => panic!("write through two handles: {e}"),
                            }
                        }
                    }
                    seqs
                })
            })
            .collect();
        let mut seqs = Vec::new();
        for w in writes {
            seqs.extend(w.await.expect("task"));
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=40).collect::<Vec<u64>>(), "round {round}: sequence numbers 1..=40, each once");
        let log = changes(&*h2.hot, &l.object, 0, 100).await.expect("log");
        assert_eq!(log.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=40).collect::<Vec<u64>>());
    }
}

/// A token raised by an empty write (how the runtime lifts the hot store's fencing floor to a
/// token cold storage has seen) is durable and shared: another handle on the database, and the
/// store after a crash, refuse the lower token. A backend that kept it in memory fenced nothing
/// once restarted.
pub async fn a_token_raised_by_an_empty_write_survives_reopen_and_fences_another_handle(f: &super::HotReopenFactory) {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(KIT_EPOCH);
    let h1 = f(clock.clone(), dir.path().to_path_buf()).await;
    let l = h1.guard.acquire(&oid("o1"), &nid("n1"), TTL).await.expect("acquire");
    h1.hot.put(&l.object, l.token, "T", "k", b("v")).await.expect("put");
    let raised = FencingToken::new(l.token.get() + 5);
    h1.hot.write(&l.object, raised, WriteBatch::new("T")).await.expect("an empty write raising the token");
    let h2 = f(clock.clone(), dir.path().to_path_buf()).await;
    let fenced_at_raised = |e: crate::Error| match e.kind() {
        ErrorKind::Fenced { presented, current, .. } => assert_eq!((*presented, *current), (l.token, raised), "{e}"),
        other => panic!("expected Fenced by the raised token, got {other:?}"),
    };
    fenced_at_raised(h2.hot.put(&l.object, l.token, "T", "k", b("stale")).await.expect_err("another handle"));
    drop(h2);
    super::crash(h1);
    let fx = f(clock.clone(), dir.path().to_path_buf()).await;
    fenced_at_raised(fx.hot.put(&l.object, l.token, "T", "k", b("stale")).await.expect_err("after a restart"));
    assert_eq!(fx.hot.get(&l.object, "k").await.expect("get"), Some(b("v")));
    assert_eq!(fx.hot.object_info(&l.object).await.expect("info").expect("kept").max_token, raised);
    clock.advance(TTL + Duration::from_millis(1));
    let next = fx.guard.acquire(&l.object, &nid("n2"), TTL).await.expect("acquire after expiry");
    assert!(next.token > raised, "a new lease above the raised token: {next:?}");
}

/// Two handles open at once on one database (two processes, or two stores in one process,
/// sharing a file) share one fencing state: a lease held through one is `LeaseHeld` through the
/// other, both ways; a lease granted through one fences every call of the other under an older
/// token at once, before the new holder writes anything, naming the new token; and a write
/// through one is visible through the other as soon as it returned. (A backend that remembers
/// the highest token per handle, or caches leases or state in the handle, passes every case
/// that uses a single handle.)
pub async fn fencing_holds_across_two_handles_on_one_database(f: &super::HotReopenFactory) {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(KIT_EPOCH);
    let h1 = f(clock.clone(), dir.path().to_path_buf()).await;
    let h2 = f(clock.clone(), dir.path().to_path_buf()).await;
    let held_by = |e: crate::Error, holder: &Lease| match e.kind() {
        ErrorKind::LeaseHeld { holder: got, expires_at, object } => {
            assert_eq!((got, *expires_at, object), (&holder.holder, holder.expires_at, &holder.object), "{e}");
        }
        other => panic!("expected LeaseHeld by {}, got {other:?}", holder.holder),
    };
    let fenced_by = |e: crate::Error, old: &Lease, new: &Lease| match e.kind() {
        ErrorKind::Fenced { presented, current, .. } => {
            assert_eq!((*presented, *current), (old.token, new.token), "{e}");
        }
        other => panic!("expected Fenced by token {}, got {other:?}", new.token),
    };
    let l1 = lease(&h1, "o1", "n1").await;
    let o = l1.object.clone();
    h1.hot.put(&o, l1.token, "T", "k", b("h1")).await.expect("h1 writes");
    let e = h2.guard.acquire(&o, &nid("n2"), TTL).await.expect_err("held through h1");
    held_by(e, &l1);
    assert_eq!(h2.guard.current(&o).await.expect("current"), Some(l1.clone()), "h2 sees h1's lease");
    assert_eq!(h2.hot.get(&o, "k").await.expect("get"), Some(b("h1")), "h2 sees h1's write");
    clock.advance(TTL + Duration::from_millis(1));
    let l2 = lease(&h2, "o1", "n2").await;
    assert!(l2.token > l1.token, "{l2:?} after {l1:?}");
    // The new lease alone fences h1, before anything is written through h2.
    let e = h1.hot.put(&o, l1.token, "T", "k", b("stale")).await.expect_err("a stale write through h1");
    fenced_by(e, &l1, &l2);
    let e = h1.hot.truncate_changes(&o, l1.token, 1).await.expect_err("a stale truncate through h1");
    fenced_by(e, &l1, &l2);
    let e = h1.guard.validate(&l1).await.expect_err("taken over through h2");
    assert!(e.is_fenced(), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let e = h1.guard.acquire(&o, &nid("n1"), TTL).await.expect_err("held through h2");
    held_by(e, &l2);
    assert_eq!(h1.guard.current(&o).await.expect("current"), Some(l2.clone()), "h1 sees h2's lease");
    assert_eq!(h1.hot.get(&o, "k").await.expect("get"), Some(b("h1")), "the stale write changed nothing");
    let r = h2.hot.put(&o, l2.token, "T", "k", b("h2")).await.expect("h2 writes");
    assert_eq!((r.first_seq, r.last_seq), (2, 2), "h2 continues h1's sequence");
    assert_eq!(h1.hot.get(&o, "k").await.expect("get"), Some(b("h2")), "h1 sees h2's write");
    let log = changes(&*h1.hot, &o, 0, 10).await.expect("log through h1");
    assert_eq!(log.iter().map(|r| (r.seq, r.token)).collect::<Vec<_>>(), [(1, l1.token), (2, l2.token)]);
    let info = h1.hot.object_info(&o).await.expect("info").expect("written");
    assert_eq!((info.last_seq, info.max_token), (2, l2.token), "through h1");
    let e = h1.hot.put(&o, l1.token, "T", "k", b("stale")).await.expect_err("still stale through h1");
    fenced_by(e, &l1, &l2);
    // And back: a takeover through h1 fences h2 the same way.
    clock.advance(TTL + Duration::from_millis(1));
    let l3 = lease(&h1, "o1", "n3").await;
    assert!(l3.token > l2.token, "{l3:?} after {l2:?}");
    let e = h2.hot.put(&o, l2.token, "T", "k", b("stale")).await.expect_err("a stale write through h2");
    fenced_by(e, &l2, &l3);
    let e = h2.guard.refresh(&l2, TTL).await.expect_err("taken over through h1");
    assert!(e.is_fenced(), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let e = h2.guard.acquire(&o, &nid("n2"), TTL).await.expect_err("held through h1");
    held_by(e, &l3);
    let r = h1.hot.put(&o, l3.token, "T", "k", b("h1 again")).await.expect("h1 writes again");
    assert_eq!(r.first_seq, 3);
    assert_eq!(h2.hot.get(&o, "k").await.expect("get"), Some(b("h1 again")), "h2 sees h1's write");
    let info = h2.hot.object_info(&o).await.expect("info").expect("written");
    assert_eq!((info.last_seq, info.max_token), (3, l3.token), "through h2");
}

/// A restore over live state replaces it: keys cold does not have are gone (a restore that
/// upserted would bring back keys deleted in cold), and the counts follow.
pub async fn restore_replaces_live_state(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    fx.hot.write(&l.object, l.token, WriteBatch::new("T").put("a", b("1")).put("b", b("22"))).await.expect("w");
    fx.hot.truncate_changes(&l.object, l.token, 2).await.expect("truncate");
    let cold = vec![crate::Entry { key: "a".into(), value: b("cold-a"), seq: 5 }];
    fx.hot.restore(&l.object, l.token, cold.clone(), 5).await.expect("restore over live state");
    assert_eq!(fx.hot.list(&l.object, KeyRange::all(), None).await.expect("list"), cold);
    assert_eq!(fx.hot.get(&l.object, "b").await.expect("get"), None, "b is not in cold's state");
    let info = fx.hot.object_info(&l.object).await.expect("info").expect("exists");
    assert_eq!((info.last_seq, info.truncated_through, info.keys, info.value_bytes), (5, 5, 1, 6));
    assert!(fx.hot.read_changes(&l.object, 0, 10).await.expect("log").is_empty(), "a restore logs nothing");
    assert_eq!(fx.hot.put(&l.object, l.token, "T", "b", b("3")).await.expect("put").first_seq, 6);
}

/// Every mutating call checks the token, an empty batch and the calls after an eviction
/// included (an eviction keeps the token maximum), and `FencingToken::NONE` is `InvalidInput`
/// on each of them.
pub async fn stale_and_none_tokens_are_refused_on_every_path(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let old = lease(&fx, "o1", "n1").await;
    fx.hot.put(&old.object, old.token, "T", "a", b("1")).await.expect("put");
    clock.advance(TTL + Duration::from_millis(1));
    let new = lease(&fx, "o1", "n2").await;
    let e = fx.hot.write(&old.object, old.token, WriteBatch::new("T")).await.expect_err("stale empty batch");
    assert!(e.is_fenced(), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    fx.hot.truncate_changes(&new.object, new.token, 1).await.expect("truncate");
    fx.hot.evict(&new.object, new.token).await.expect("evict");
    let e = fx.hot.put(&old.object, old.token, "T", "a", b("stale")).await.expect_err("stale write after evict");
    assert!(e.is_fenced(), "the eviction kept the token maximum: {e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let e = fx.hot.restore(&old.object, old.token, vec![], 1).await.expect_err("stale restore after evict");
    assert!(e.is_fenced(), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let info = fx.hot.object_info(&new.object).await.expect("info").expect("kept");
    assert_eq!(info.max_token, new.token);
    // A refused restore leaves the eviction mark (cleared, the evicted object would be served
    // empty as resident).
    assert!(!info.resident, "a fenced restore leaves the object evicted: {info:?}");
    let none = FencingToken::NONE;
    let o = &new.object;
    let errs = [
        fx.hot.write(o, none, WriteBatch::new("T")).await.expect_err("empty batch"),
        fx.hot.truncate_changes(o, none, 0).await.expect_err("truncate"),
        fx.hot.evict(o, none).await.expect_err("evict"),
        fx.hot.restore(o, none, vec![], 1).await.expect_err("restore"),
    ];
    for e in errs {
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "NONE: {e}");
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    }
    fx.hot.put(o, new.token, "T", "a", b("2")).await.expect("the holder still writes");
}

/// A batch of exactly `WriteBatch::MAX_BYTES` of keys and values is accepted whole; one byte
/// more is `LimitExceeded` naming both, with nothing applied.
pub async fn a_batch_of_exactly_the_byte_limit_is_accepted(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let n = WriteBatch::MAX_BYTES / MAX_VALUE_BYTES;
    let keys: Vec<String> = (0..n).map(|i| format!("k{i:02}")).collect();
    let key_bytes: usize = keys.iter().map(String::len).sum();
    let full = Bytes::from(vec![5u8; MAX_VALUE_BYTES]);
    let batch = |extra: usize| {
        keys.iter().enumerate().fold(WriteBatch::new("T"), |b, (i, k)| {
            let v = if i + 1 < n { full.clone() } else { Bytes::from(vec![6u8; MAX_VALUE_BYTES - key_bytes + extra]) };
            b.put(k.clone(), v)
        })
    };
    let e = fx.hot.write(&l.object, l.token, batch(1)).await.expect_err("one byte over the limit");
    match e.kind() {
        ErrorKind::LimitExceeded { limit, actual, .. } => {
            assert_eq!((*limit, *actual), (WriteBatch::MAX_BYTES as u64, WriteBatch::MAX_BYTES as u64 + 1), "{e}");
        }
        other => panic!("expected LimitExceeded, got {other:?}"),
    }
    assert_eq!(fx.hot.get(&l.object, &keys[0]).await.expect("get"), None, "nothing of it written");
    let r = fx.hot.write(&l.object, l.token, batch(0)).await.expect("a batch of exactly the limit");
    assert_eq!(r.last_seq + 1 - r.first_seq, n as u64);
    let last = fx.hot.get(&l.object, &keys[n - 1]).await.expect("get").expect("written");
    assert_eq!(last.len(), MAX_VALUE_BYTES - key_bytes);
}

/// A restore whose entries together are larger than one write batch may be (33 values of
/// 2 MiB, 66 MiB: an evicted object's state is as large as its writes made it, over many
/// batches) installs them all in one call: the runtime restores an object's whole cold state
/// at once, and a backend that checked a restore as one batch, or sent it in one request a
/// server refuses, could never bring such an object back.
pub async fn a_restore_larger_than_a_write_batch_installs_every_entry(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let n = WriteBatch::MAX_BYTES / MAX_VALUE_BYTES + 1;
    let value = |i: usize| Bytes::from(vec![(i % 251) as u8; MAX_VALUE_BYTES]);
    let entries: Vec<crate::Entry> =
        (0..n).map(|i| crate::Entry { key: format!("k{i:02}"), value: value(i), seq: i as u64 + 1 }).collect();
    let through = n as u64 + 7;
    fx.hot.restore(&l.object, l.token, entries, through).await.expect("a restore of 66 MiB");
    let info = fx.hot.object_info(&l.object).await.expect("info").expect("restored");
    assert_eq!((info.last_seq, info.keys, info.value_bytes), (through, n as u64, (n * MAX_VALUE_BYTES) as u64));
    for i in [0, n / 2, n - 1] {
        let got = fx.hot.get(&l.object, &format!("k{i:02}")).await.expect("get");
        assert!(got.as_ref() == Some(&value(i)), "k{i:02}: {:?} bytes", got.map(|v| v.len()));
    }
    let r = fx.hot.put(&l.object, l.token, "T", "next", b("v")).await.expect("writes continue");
    assert_eq!(r.first_seq, through + 1);
}

/// A restore with a key twice, an entry newer than its `through_seq` or an invalid key is
/// `InvalidInput`, one with a key or value over its size limit `LimitExceeded`, and none changes
/// anything (state, sequence and token stay as they were).
pub async fn restore_refuses_malformed_state(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let e = |key: &str, seq| crate::Entry { key: key.into(), value: b("v"), seq };
    fx.hot.restore(&l.object, l.token, vec![e("a", 2)], 2).await.expect("restore");
    let higher = FencingToken::new(l.token.get() + 1);
    for (entries, through, why) in [
        (vec![e("a", 3), e("b", 4), e("a", 5)], 5, "a key twice"),
        (vec![e("a", 3), e("b", 9)], 5, "an entry above through_seq"),
        (vec![e("a", 3), e("b", 0)], 5, "an entry at seq 0, set by no change"),
    ] {
        let err = fx.hot.restore(&l.object, higher, entries, through).await.expect_err(why);
        assert_eq!(err.kind(), &ErrorKind::InvalidInput, "{why}: {err}");
    }
    let big = |key: String, len: usize| crate::Entry { key, value: Bytes::from(vec![b'x'; len]), seq: 3 };
    for (entry, why, limit) in [
        (big("v".into(), crate::MAX_VALUE_BYTES + 1), "a value over the limit", true),
        (big("k".repeat(crate::MAX_KEY_BYTES + 1), 1), "a key over the limit", true),
        (
            big("é".repeat(crate::MAX_KEY_BYTES / 2 + 1), 1),
            "a key of fewer characters than the limit, more bytes",
            true,
        ),
        (e("", 3), "an empty key", false),
        (e("a\nb", 3), "a key with a control character", false),
    ] {
        let err = fx.hot.restore(&l.object, higher, vec![entry], 3).await.expect_err(why);
        if limit {
            assert!(matches!(err.kind(), ErrorKind::LimitExceeded { .. }), "{why}: {err}");
        } else {
            assert_eq!(err.kind(), &ErrorKind::InvalidInput, "{why}: {err}");
        }
    }
    assert_eq!(fx.hot.list(&l.object, KeyRange::all(), None).await.expect("list"), vec![e("a", 2)]);
    let info = fx.hot.object_info(&l.object).await.expect("info").expect("exists");
    assert_eq!(info.last_seq, 2);
    let r = fx.hot.put(&l.object, l.token, "T", "b", b("2")).await.expect("the holder still writes");
    assert_eq!(r.first_seq, 3);
}

/// A call that is refused (invalid or conflicting) changes nothing, its token included: a
/// higher token presented by a refused truncate, evict or restore does not fence the holder.
pub async fn refused_calls_do_not_raise_the_token(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    fx.hot.put(&l.object, l.token, "T", "a", b("1")).await.expect("put");
    let higher = FencingToken::new(l.token.get() + 10);
    let e = fx.hot.truncate_changes(&l.object, higher, 99).await.expect_err("beyond the last seq");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput);
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let e = fx.hot.evict(&l.object, higher).await.expect_err("undrained");
    assert_eq!(e.kind(), &ErrorKind::Conflict);
    let e = fx.hot.restore(&l.object, higher, vec![], 5).await.expect_err("pending changes");
    assert_eq!(e.kind(), &ErrorKind::Conflict);
    assert!(fx.hot.read_changes(&l.object, u64::MAX, 10).await.expect("after the last possible seq").is_empty());
    let r = fx.hot.put(&l.object, l.token, "T", "a", b("2")).await.expect("the holder is not fenced");
    assert_eq!(r.first_seq, 2);
    let info = fx.hot.object_info(&l.object).await.expect("info").expect("exists");
    assert_eq!(info.max_token, l.token, "the refused calls raised nothing");
}

/// Three objects leased by `n1` (`t`, `e`, `r`) whose token a truncation, an eviction and a
/// restore under [`higher`] raised.
async fn raised_by_truncate_evict_and_restore(fx: &HotFixture) -> [Lease; 3] {
    let (t, e, r) = (lease(fx, "t", "n1").await, lease(fx, "e", "n1").await, lease(fx, "r", "n1").await);
    fx.hot.put(&t.object, t.token, "T", "a", b("1")).await.expect("put");
    fx.hot.truncate_changes(&t.object, higher(&t), 1).await.expect("truncate under a higher token");
    fx.hot.put(&e.object, e.token, "T", "a", b("1")).await.expect("put");
    fx.hot.truncate_changes(&e.object, e.token, 1).await.expect("drain");
    fx.hot.evict(&e.object, higher(&e)).await.expect("evict under a higher token");
    let entry = crate::Entry { key: "a".into(), value: b("cold"), seq: 1 };
    fx.hot.restore(&r.object, higher(&r), vec![entry], 1).await.expect("restore under a higher token");
    [t, e, r]
}

/// A token seven above `l`'s.
fn higher(l: &Lease) -> FencingToken {
    FencingToken::new(l.token.get() + 7)
}

/// Tokens are compared as numbers: once leases reach two digits, a write, an empty write or a
/// guard call under a one-digit token is stale (as text, "9" sorts above "10": a backend
/// storing tokens as strings let the stale holder write).
pub async fn fencing_compares_tokens_as_numbers(f: &HotFactory) {
    let (fx, _) = open(f).await;
    wide_tokens_fence_narrower_ones(&fx).await;
    let o = oid("o1");
    let mut prev = lease(&fx, "o1", "n1").await;
    if prev.token.get() >= 10 {
        // A backend whose first token has two digits already: no one-digit token to try.
        return;
    }
    let mut cur = prev.clone();
    while cur.token.get() < 10 {
        fx.hot.put(&o, cur.token, "T", "k", b(&cur.token.to_string())).await.expect("put");
        fx.guard.release(&cur).await.expect("release");
        prev = cur;
        cur = lease(&fx, "o1", "n1").await;
        assert!(cur.token > prev.token, "token {} after {}", cur.token, prev.token);
    }
    fx.hot.write(&o, cur.token, WriteBatch::new("T")).await.expect("an empty write under the new lease");
    let e = fx.hot.put(&o, prev.token, "T", "k", b("stale")).await.expect_err("stale");
    assert!(
        matches!(e.kind(), ErrorKind::Fenced { presented, current, .. } if *presented == prev.token && *current == cur.token),
        "{e}"
    );
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let e = fx.guard.validate(&prev).await.expect_err("stale lease");
    assert!(e.is_fenced(), "{e}");
    assert!(fx.guard.refresh(&prev, TTL).await.expect_err("stale lease").is_fenced());
    fx.guard.validate(&cur).await.expect("current");
    fx.hot.put(&o, cur.token, "T", "k", b("new")).await.expect("the current holder writes");
    assert_eq!(fx.hot.get(&o, "k").await.expect("get"), Some(b("new")));
}

/// Across the widths a backend might store a token in (text, 32-bit integers), whatever token its
/// guard starts at: empty writes under ever wider tokens each fence the one before (naming the
/// wider one), and the next lease is above them all.
async fn wide_tokens_fence_narrower_ones(fx: &HotFixture) {
    let o = oid("wide");
    let first = lease(fx, "wide", "n1").await;
    let mut below = first.token;
    for t in [999, 1_000, (1 << 31) - 1, 1 << 31, 1 << 32, (1 << 32) + 1] {
        let t = FencingToken::new(t.max(below.get() + 1));
        fx.hot.write(&o, t, WriteBatch::new("T")).await.expect("an empty write under a wider token");
        let e = fx.hot.put(&o, below, "T", "k", b("stale")).await.expect_err("the narrower token is stale");
        assert!(
            matches!(e.kind(), ErrorKind::Fenced { presented, current, .. } if *presented == below && *current == t),
            "{below} after {t}: {e}"
        );
        below = t;
    }
    fx.guard.release(&first).await.expect("release");
    let next = lease(fx, "wide", "n2").await;
    assert!(next.token > below, "a lease at {} after a write at {below}", next.token);
    fx.hot.put(&o, next.token, "T", "k", b("new")).await.expect("the new holder writes");
    assert_eq!(fx.hot.get(&o, "k").await.expect("get"), Some(b("new")));
}

/// A successful truncate, evict or restore under a higher token raises the object's token like
/// a write does: afterwards the old token is fenced, naming the higher one.
pub async fn successful_calls_with_a_higher_token_raise_it(f: &HotFactory) {
    let (fx, _) = open(f).await;
    // An empty write or a restore of nothing at 0 raises the token but makes no object.
    let (w0, r0) = (lease(&fx, "w0", "n1").await, lease(&fx, "r0", "n1").await);
    fx.hot.write(&w0.object, FencingToken::new(w0.token.get() + 3), WriteBatch::new("T")).await.expect("empty write");
    fx.hot.restore(&r0.object, FencingToken::new(r0.token.get() + 3), Vec::new(), 0).await.expect("empty restore");
    for l in [&w0, &r0] {
        assert_eq!(fx.hot.object_info(&l.object).await.expect("info"), None, "{}", l.object);
        let err = fx.hot.put(&l.object, l.token, "T", "a", b("stale")).await.expect_err("raised");
        assert!(err.is_fenced(), "{}: {err}", l.object);
        // Only leases count for the guard (its contract): the lease is still current.
        fx.guard.validate(l).await.expect("a token raised by the store leaves the lease current");
        fx.guard.refresh(l, TTL).await.expect("a token raised by the store leaves the lease current");
    }
    let [t, e, r] = raised_by_truncate_evict_and_restore(&fx).await;
    for l in [&t, &e, &r] {
        let err = fx.hot.put(&l.object, l.token, "T", "a", b("stale")).await.expect_err("the old token");
        match err.kind() {
            ErrorKind::Fenced { presented, current, .. } => {
                assert_eq!((*presented, *current), (l.token, higher(l)), "{}: {err}", l.object)
            }
            other => panic!("{}: expected Fenced, got {other:?}", l.object),
        }
    }
    for l in [&t, &r] {
        let info = fx.hot.object_info(&l.object).await.expect("info").expect("exists");
        assert_eq!(info.max_token, higher(l), "{}", l.object);
    }
}

/// Many concurrent writers under one token each get distinct, gap-free sequence numbers.
pub async fn concurrent_writers_get_unique_sequences(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let hot = fx.hot.clone();
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..25 {
                let r = put_retrying(&*hot, &l, &format!("t{t}-{i}"), Bytes::from(vec![t as u8])).await;
                seqs.push(r.first_seq);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort_unstable();
    assert_eq!(all, (1..=200).collect::<Vec<u64>>());
    assert_eq!(fx.hot.list(&l.object, KeyRange::all(), None).await.expect("list").len(), 200);
}

/// Concurrent batches of several operations on one object each get one contiguous range of
/// sequence numbers: the change log holds each batch's operations together, in its order, at
/// the numbers its receipt gives. (A backend that numbers each operation from a shared counter
/// outside the batch's atomic step interleaves two batches, 1 and 3 against 2 and 4, and a
/// receipt's range then covers half of another batch.)
pub async fn concurrent_batches_get_contiguous_ranges(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let mut tasks = Vec::new();
    for t in 0..8u8 {
        let (hot, l) = (fx.hot.clone(), l.clone());
        tasks.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..10 {
                let keys: Vec<String> = (0..2 + i % 2).map(|j| format!("t{t}-{i}-{j}")).collect();
                let batch = keys.iter().fold(WriteBatch::new("T"), |b, k| b.put(k.as_str(), Bytes::from(vec![t])));
                let r = super::retrying("write", || hot.write(&l.object, l.token, batch.clone())).await;
                written.push((r, keys));
                tokio::task::yield_now().await;
            }
            written
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let log = changes(&*fx.hot, &l.object, 0, 10_000).await.expect("log");
    assert_eq!(log.len(), all.iter().map(|(_, keys)| keys.len()).sum::<usize>(), "every operation logged once");
    let by_seq: std::collections::HashMap<u64, &str> = log.iter().map(|c| (c.seq, c.key.as_str())).collect();
    for (r, keys) in &all {
        let logged: Vec<&str> = (r.first_seq..=r.last_seq).map(|s| by_seq.get(&s).copied().unwrap_or("-")).collect();
        assert_eq!(logged, *keys, "the batch's range holds its own operations, in order: {r:?}");
    }
}

/// `put` under `l`, sent again after a retryable error (a backend on a database with optimistic
/// concurrency may answer one under contention; it applied nothing): at most 50 attempts.
async fn put_retrying(hot: &dyn crate::HotStore, l: &crate::Lease, key: &str, value: Bytes) -> crate::WriteReceipt {
    super::retrying(&format!("put of {key}"), || hot.put(&l.object, l.token, "T", key, value.clone())).await
}

/// A reader's finished rounds, which writers wait for now and then: so the reads of a case
/// provably ran while the writes were in flight, also on a backend fast enough to finish every
/// write before a reader's first read.
#[derive(Clone, Default)]
pub(crate) struct Rounds(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Rounds {
    pub(crate) fn done(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Wait until the reader ran a whole round after this call (two rounds finish: the one
    /// under way may have read before it).
    pub(crate) async fn wait_for_a_whole_round(&self) {
        let since = self.0.load(std::sync::atomic::Ordering::SeqCst);
        while self.0.load(std::sync::atomic::Ordering::SeqCst) < since + 2 {
            tokio::task::yield_now().await;
        }
    }
}

/// Truncation running alongside writers drops exactly what it was told to: a drain loop reads
/// the change log on from the last change it saw and truncates through it, while writers keep
/// appending; in the end the changes it saw and the log left over are every change once, in
/// order, none lost. (A backend whose truncation drops more than `seq <= through`, say every
/// change of the object in a step of its own, loses changes written between the read and the
/// truncation.)
pub async fn truncation_concurrent_with_writes_loses_no_change(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let rounds = Rounds::default();
    let mut writers = Vec::new();
    for t in 0..4u8 {
        let (hot, l, rounds) = (fx.hot.clone(), l.clone(), rounds.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..30 {
                put_retrying(&*hot, &l, &format!("t{t}-{i}"), Bytes::from(vec![t])).await;
                if i % 10 == 4 {
                    // A drain round runs while this writer has more to write.
                    rounds.wait_for_a_whole_round().await;
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    let (mut seen, mut after, mut truncations) = (Vec::new(), 0u64, 0u32);
    loop {
        // Decided before the read: a read after every writer finished is the last one.
        let finished = writers.iter().all(|w| w.is_finished());
        let page = super::retrying("read changes", || fx.hot.read_changes(&l.object, after, 1000)).await;
        if let Some(last) = page.last() {
            after = last.seq;
            seen.extend(page.iter().map(|c| c.seq));
            super::retrying("truncate through the last change seen", || {
                fx.hot.truncate_changes(&l.object, l.token, after)
            })
            .await;
            truncations += 1;
        }
        rounds.done();
        if finished {
            break;
        }
        tokio::task::yield_now().await;
    }
    for w in writers {
        w.await.expect("writer");
    }
    // What is left, read from the start: only changes after the last truncation.
    let (mut rest, mut from) = (Vec::new(), 0u64);
    loop {
        let page = fx.hot.read_changes(&l.object, from, 1000).await.expect("read the rest");
        let Some(last) = page.last() else { break };
        from = last.seq;
        rest.extend(page.iter().map(|c| c.seq));
    }
    let info = fx.hot.object_info(&l.object).await.expect("info").expect("written");
    assert_eq!(info.last_seq, 120, "every write got a sequence number");
    assert_eq!(info.truncated_through, after);
    assert!(truncations >= 2, "a truncation ran while writers were writing ({truncations} in all)");
    let all: Vec<u64> = seen.iter().chain(&rest).copied().collect();
    assert_eq!(
        all,
        (1..=info.last_seq).collect::<Vec<_>>(),
        "the changes read ({} of them, {truncations} truncations) and the {} left over: each change once, in order",
        seen.len(),
        rest.len()
    );
    assert_eq!(fx.hot.list(&l.object, KeyRange::all(), None).await.expect("list").len(), 120, "state untouched");
}

/// A batch is atomic to readers running alongside its writer: a listing shows both keys of a
/// two-key batch with the same value (from the same batch) or neither, and the change log
/// never holds half of a batch. (A backend that applies a batch's operations in separate
/// steps, or reads outside one snapshot, shows a half-applied batch.)
pub async fn a_batch_is_atomic_to_concurrent_readers(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    const ROUNDS: u64 = 300;
    let rounds = Rounds::default();
    let writer = {
        let (hot, l, rounds) = (fx.hot.clone(), l.clone(), rounds.clone());
        tokio::spawn(async move {
            for i in 0..ROUNDS {
                let v = Bytes::from(format!("v{i}"));
                let batch = WriteBatch::new("T").put("a", v.clone()).put("b", v);
                let r = super::retrying("write", || hot.write(&l.object, l.token, batch.clone())).await;
                assert_eq!((r.first_seq, r.last_seq), (2 * i + 1, 2 * i + 2));
                if i % 25 == 24 {
                    // A reader round runs while there are batches left to write.
                    rounds.wait_for_a_whole_round().await;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    // The whole log, paged (an answer may be shorter than asked); pages read one after another
    // while batches land still join to whole batches.
    let read_log = || async {
        let (mut log, mut after) = (Vec::new(), 0u64);
        loop {
            let page = super::retrying("read changes", || fx.hot.read_changes(&l.object, after, 10_000)).await;
            let Some(last) = page.last() else { return log };
            after = last.seq;
            log.extend(page);
        }
    };
    let (mut reads, mut midway, mut newest) = (0u32, 0u32, None::<u64>);
    loop {
        let finished = writer.is_finished();
        let listed = super::retrying("list", || fx.hot.list(&l.object, KeyRange::all(), None)).await;
        match listed.as_slice() {
            [] => assert_eq!(newest, None, "a listing lost both keys (read {reads})"),
            [ea, eb] => {
                assert_eq!((ea.key.as_str(), eb.key.as_str()), ("a", "b"));
                assert_eq!(ea.value, eb.value, "a and b listed from different batches (read {reads})");
                assert_eq!(eb.seq, ea.seq + 1, "a and b listed from different batches (read {reads})");
                let round = std::str::from_utf8(&ea.value).ok().and_then(|v| v.strip_prefix('v')?.parse().ok());
                let round: u64 = round.expect("a value this case wrote");
                assert!(newest.is_none_or(|n| n <= round), "the listing went back from batch {newest:?} to {round}");
                newest = Some(round);
            }
            other => {
                let keys: Vec<&str> = other.iter().map(|e| e.key.as_str()).collect();
                panic!("half a batch listed (read {reads}): {keys:?}");
            }
        }
        let log = read_log().await;
        assert_eq!(log.len() % 2, 0, "half a batch in the change log (read {reads}): {} changes", log.len());
        for (i, pair) in log.chunks(2).enumerate() {
            assert_eq!((pair[0].seq, pair[1].seq), (2 * i as u64 + 1, 2 * i as u64 + 2), "read {reads}");
            assert_eq!((pair[0].key.as_str(), pair[1].key.as_str()), ("a", "b"), "read {reads}");
            assert_eq!(pair[0].value, pair[1].value, "read {reads}");
        }
        if !listed.is_empty() && (log.len() as u64) < 2 * ROUNDS {
            midway += 1;
        }
        reads += 1;
        rounds.done();
        if finished {
            break;
        }
        tokio::task::yield_now().await;
    }
    writer.await.expect("writer");
    assert!(midway > 0, "no read ran while batches were landing ({reads} reads)");
    assert_eq!(read_log().await.len() as u64, 2 * ROUNDS);
}

/// A takeover while the old holder's writes are in flight: every old-token write sent after the
/// new lease was granted is `Fenced` (the check and the write are one atomic step), and along the
/// change log tokens never go down.
pub async fn takeover_during_concurrent_writes_fences_every_later_old_write(f: &HotFactory) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let (fx, clock) = open(f).await;
    let old = lease(&fx, "o1", "n1").await;
    let granted = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..6u8 {
        let (hot, old, granted) = (fx.hot.clone(), old.clone(), granted.clone());
        tasks.push(tokio::spawn(async move {
            let (mut late_accepted, mut fenced_late) = (0u32, 0u32);
            let mut after_grant = 0u32;
            let mut i = 0u32;
            while after_grant < 15 {
                let sent_after_grant = granted.load(Ordering::SeqCst);
                let r = hot.put(&old.object, old.token, "T", &format!("t{t}-{i}"), Bytes::from(vec![t])).await;
                match r {
                    Ok(_) if sent_after_grant => late_accepted += 1,
                    Ok(_) => {}
                    Err(e) if e.is_fenced() => fenced_late += u32::from(sent_after_grant),
                    // (Or retryably under contention, applying nothing.)
                    Err(e) => assert!(e.is_retryable(), "an old-token write fails only as Fenced: {e}"),
                }
                after_grant += u32::from(sent_after_grant);
                i += 1;
                tokio::task::yield_now().await;
            }
            (late_accepted, fenced_late)
        }));
    }
    // Let the old holder's writes run for a while, then take over. (Calls made while the old
    // holder's writes run are sent again after a retryable error, as theirs are.)
    let info = || super::retrying("object info", || fx.hot.object_info(&old.object));
    while info().await.map_or(0, |i| i.last_seq) < 20 {
        tokio::task::yield_now().await;
    }
    clock.advance(TTL + Duration::from_millis(1));
    let (o1, n2) = (oid("o1"), nid("n2"));
    let new = super::retrying("acquire", || fx.guard.acquire(&o1, &n2, TTL)).await;
    granted.store(true, std::sync::atomic::Ordering::SeqCst);
    // Every change logged after the grant is the new holder's: an old-token write whose check
    // ran before the grant and whose write landed after it (a check and a write that are not
    // one atomic step) shows as an old token above this point, whether or not its caller
    // counted it as sent after the grant.
    let floor = info().await.map_or(0, |i| i.last_seq);
    let mut new_writes = 0;
    for i in 0..10 {
        put_retrying(&*fx.hot, &new, &format!("new-{i}"), b("n")).await;
        new_writes += 1;
    }
    let mut fenced = 0;
    for t in tasks {
        let (accepted, fenced_late) = t.await.expect("task");
        assert_eq!(accepted, 0, "an old-token write sent after the takeover was accepted");
        fenced += fenced_late;
    }
    assert!(fenced > 0, "no old-token write sent after the takeover was refused as Fenced (retryable errors only)");
    let log = changes(&*fx.hot, &old.object, 0, 10_000).await.expect("log");
    assert!(log.windows(2).all(|w| w[0].token <= w[1].token), "tokens go down along the change log");
    let late = log.iter().filter(|r| r.seq > floor && r.token < new.token).count();
    assert_eq!(late, 0, "old-token writes landed after the takeover was granted (seq above {floor})");
    assert_eq!(log.iter().filter(|r| r.token == new.token).count(), new_writes);
    assert_eq!(log.last().map(|r| r.token), Some(new.token));
}

/// Acquire issues a token and blocks other holders with `LeaseHeld` naming the holder.
pub async fn acquire_grants_token_and_blocks_others(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    assert!(l.token > FencingToken::NONE);
    assert_eq!(l.holder, nid("n1"));
    assert_eq!(l.acquired_at, clock.now());
    assert_eq!(l.expires_at, clock.now().plus(TTL));
    let e = fx.guard.acquire(&oid("o1"), &nid("n2"), TTL).await.expect_err("held");
    match e.kind() {
        ErrorKind::LeaseHeld { holder, expires_at, object } => {
            assert_eq!(holder, &nid("n1"));
            assert_eq!(*expires_at, l.expires_at);
            assert_eq!(object, &oid("o1"));
        }
        other => panic!("expected LeaseHeld, got {other:?}"),
    }
    let e = fx.guard.acquire(&oid("o1"), &nid("n1"), TTL).await.expect_err("re-acquire by holder");
    assert!(matches!(e.kind(), ErrorKind::LeaseHeld { .. }));
    assert!(!fx.guard.is_available(&oid("o1")).await.expect("available"));
    assert_eq!(fx.guard.current(&oid("o1")).await.expect("current"), Some(l.clone()));
    // Other objects are independent.
    lease(&fx, "o2", "n2").await;
    // Times off the millisecond: held 1 µs before its expiry, free at it (a guard keeping lease
    // times in whole milliseconds, or rounding them, fails here).
    clock.advance(std::time::Duration::from_micros(250));
    let e1 = lease(&fx, "edge", "n1").await;
    assert_eq!(e1.expires_at, clock.now().plus(TTL));
    clock.advance(TTL - std::time::Duration::from_micros(1));
    let e = fx.guard.acquire(&e1.object, &nid("n2"), TTL).await.expect_err("1 µs before the expiry");
    assert!(matches!(e.kind(), ErrorKind::LeaseHeld { .. }), "{e}");
    fx.guard.validate(&e1).await.expect("valid 1 µs before the expiry");
    clock.advance(std::time::Duration::from_micros(1));
    let next = fx.guard.acquire(&e1.object, &nid("n2"), TTL).await.expect("free at the expiry");
    assert!(next.token > e1.token);
}

/// Evict and restore leave the lease alone: its holder still holds it, other nodes are refused,
/// and the token issued after it is higher (a backend that dropped the lease row with the
/// object's state freed a held object, or issued its token again).
pub async fn evict_and_restore_keep_the_lease(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    fx.hot.put(&l.object, l.token, "T", "a", b("1")).await.expect("put");
    fx.hot.truncate_changes(&l.object, l.token, 1).await.expect("truncate");
    let still_held = |when: &'static str| {
        let (fx, l) = (&fx, &l);
        async move {
            assert_eq!(fx.guard.current(&l.object).await.expect("current"), Some(l.clone()), "{when}");
            fx.guard.validate(l).await.unwrap_or_else(|e| panic!("{when}: the lease is valid: {e}"));
            let e = fx.guard.acquire(&l.object, &nid("n2"), TTL).await.expect_err(when);
            assert!(matches!(e.kind(), ErrorKind::LeaseHeld { .. }), "{when}: {e}");
        }
    };
    fx.hot.evict(&l.object, l.token).await.expect("evict");
    still_held("after evict").await;
    let entries = vec![crate::Entry { key: "a".into(), value: b("1"), seq: 1 }];
    fx.hot.restore(&l.object, l.token, entries, 1).await.expect("restore");
    still_held("after restore").await;
    clock.advance(TTL);
    let n = lease(&fx, "o1", "n2").await;
    assert!(n.token > l.token, "the next token ({}) is above the evicted holder's ({})", n.token, l.token);
}

/// A batch refused as invalid under a higher token than the object has seen changes nothing:
/// no part of it is written, no sequence number is used and the token is not raised (the
/// holder is not fenced by a write that never happened).
pub async fn refused_batches_under_a_higher_token_change_nothing(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    fx.hot.put(&l.object, l.token, "T", "x", b("0")).await.expect("put");
    let higher = FencingToken::new(l.token.get() + 5);
    // (With the kind the contract gives each: `LimitExceeded` for a key or value over its limit.)
    let refused = [
        ("an empty key", false, WriteBatch::new("T").put("a", b("1")).put("", b("2"))),
        ("a key with a line break", false, WriteBatch::new("T").put("a", b("1")).delete("a\nb")),
        (
            "a key over the limit",
            true,
            WriteBatch::new("T").put("a", b("1")).put("k".repeat(crate::MAX_KEY_BYTES + 1), b("2")),
        ),
        (
            "a value over the limit",
            true,
            WriteBatch::new("T").put("a", b("1")).put("b", vec![0u8; MAX_VALUE_BYTES + 1]),
        ),
        ("an empty type name", false, WriteBatch::new("").put("a", b("1"))),
    ];
    for (what, over_a_limit, batch) in refused {
        let e = fx.hot.write(&l.object, higher, batch).await.expect_err(what);
        if over_a_limit {
            assert!(matches!(e.kind(), ErrorKind::LimitExceeded { .. }), "{what}: {e}");
            assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
        } else {
            assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{what}: {e}");
            assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
        }
        assert_eq!(fx.hot.get(&l.object, "a").await.expect("get"), None, "{what}: nothing of it written");
        let info = fx.hot.object_info(&l.object).await.expect("info").expect("exists");
        assert_eq!((info.max_token, info.last_seq), (l.token, 1), "{what}: no token raised, no sequence used");
    }
    // A truncation beyond the last change under a higher token: refused, token not raised,
    // nothing truncated.
    let e = fx.hot.truncate_changes(&l.object, higher, 2).await.expect_err("beyond the last change");
    assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let info = fx.hot.object_info(&l.object).await.expect("info").expect("exists");
    assert_eq!((info.max_token, info.last_seq, info.truncated_through), (l.token, 1, 0), "a refused truncation");
    assert_eq!(changes(&*fx.hot, &l.object, 0, 10).await.expect("changes").len(), 1, "change 1 still logged");
    let r = fx.hot.put(&l.object, l.token, "T", "a", b("1")).await.expect("the holder is not fenced");
    assert_eq!(r.first_seq, 2);
}

/// A stale token is refused for a batch of any shape, not only a single put: deletes alone, a
/// put then a delete, a delete then a put, a run of puts, a long mixed batch. Each is `Fenced`
/// naming both tokens, and nothing of it lands (state, change log and object info unchanged).
pub async fn stale_batches_of_every_shape_are_fenced(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let old = lease(&fx, "o1", "n1").await;
    let first = WriteBatch::new("T").put("a", b("1")).put("b", b("2"));
    fx.hot.write(&old.object, old.token, first).await.expect("write");
    clock.advance(TTL + Duration::from_millis(1));
    let new = lease(&fx, "o1", "n2").await;
    let state = |fx: &HotFixture| {
        let (hot, object) = (fx.hot.clone(), old.object.clone());
        async move {
            let entries = hot.list(&object, KeyRange::all(), None).await.expect("list");
            let log = changes(&*hot, &object, 0, 1_000).await.expect("changes");
            let info = hot.object_info(&object).await.expect("info");
            (
                entries.into_iter().map(|e| (e.key, e.value, e.seq)).collect::<Vec<_>>(),
                log.into_iter().map(|c| (c.seq, c.key, c.op, c.value)).collect::<Vec<_>>(),
                info,
            )
        }
    };
    let before = state(&fx).await;
    let mut long = WriteBatch::new("T");
    for i in 0..300 {
        long = if i % 3 == 0 { long.delete(format!("k{i}")) } else { long.put(format!("k{i}"), b("x")) };
    }
    long = long.delete("a");
    let shapes = [
        ("a delete", WriteBatch::new("T").delete("a")),
        ("a put then a delete", WriteBatch::new("T").put("z", b("9")).delete("a")),
        ("a delete then a put", WriteBatch::new("T").delete("a").put("z", b("9"))),
        ("a run of puts", (0..50).fold(WriteBatch::new("T"), |w, i| w.put(format!("p{i}"), b("y")))),
        ("a long mixed batch", long),
    ];
    for (what, batch) in shapes {
        let e = fx.hot.write(&old.object, old.token, batch).await.expect_err(what);
        match e.kind() {
            ErrorKind::Fenced { presented, current, object } => {
                assert_eq!((*presented, *current, object), (old.token, new.token, &old.object), "{what}: {e}")
            }
            other => panic!("{what}: expected Fenced, got {other:?}"),
        }
        assert_eq!(state(&fx).await, before, "{what}: nothing of a stale batch lands");
    }
    let r = fx.hot.write(&new.object, new.token, WriteBatch::new("T").delete("a")).await.expect("the holder writes");
    assert_eq!(r.first_seq, 3, "no sequence number was used by the refused batches");
}

/// A new lease's token is above every token the store accepted, also one raised by a
/// truncation, an eviction or a restore under a higher token (not only by a write): the new
/// holder's writes are not fenced by its own store.
pub async fn a_new_lease_is_above_tokens_raised_by_truncate_evict_and_restore(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let [t, e, r] = raised_by_truncate_evict_and_restore(&fx).await;
    clock.advance(TTL + Duration::from_millis(1));
    for l in [&t, &e, &r] {
        let next = lease(&fx, l.object.as_str(), "n2").await;
        assert!(next.token > higher(l), "{}: new token {} not above {}", l.object, next.token, higher(l));
        fx.hot.put(&next.object, next.token, "T", "b", b("2")).await.expect("the new holder writes");
        assert_eq!(fx.hot.get(&next.object, "b").await.expect("get"), Some(b("2")), "{}", l.object);
    }
}

/// Node ids of the longest length are kept whole: a lease names its holder exactly, and two
/// holders that differ only in the last byte are two nodes.
pub async fn holders_at_the_id_limit_stay_distinct(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let base = "n".repeat(crate::NodeId::MAX_LEN - 1);
    let (h1, h2) = (nid(&format!("{base}1")), nid(&format!("{base}2")));
    let o = oid("o1");
    let l = fx.guard.acquire(&o, &h1, TTL).await.expect("acquire");
    assert_eq!(l.holder, h1, "the lease names its holder whole");
    assert_eq!(fx.guard.current(&o).await.expect("current"), Some(l.clone()));
    fx.guard.validate(&l).await.expect("the lease is valid");
    let e = fx.guard.acquire(&o, &h2, TTL).await.expect_err("held by another node");
    match e.kind() {
        ErrorKind::LeaseHeld { holder, .. } => assert_eq!(holder, &h1),
        other => panic!("expected LeaseHeld, got {other:?}"),
    }
    let r = fx.guard.refresh(&l, TTL).await.expect("refresh");
    assert_eq!((r.holder, r.token), (h1, l.token));
    fx.hot.put(&o, l.token, "T", "k", b("v")).await.expect("the holder writes");
}

/// Objects with pending changes come in byte order of their ids (upper case before lower
/// case, a prefix before the ids it starts), the same with one object per page: an order by
/// another collation makes paging by `after` skip or repeat objects.
pub async fn pending_objects_page_in_byte_order(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let ids = ["b", "a0", "B", "ab", "Ab", "a", "a-b", "a/b", "_x", "Z9", "c"];
    for id in ids {
        let l = lease(&fx, id, "n1").await;
        fx.hot.put(&l.object, l.token, "T", "k", b("v")).await.expect("put");
    }
    let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    want.sort();
    let all = fx.hot.objects_with_pending_changes(None, 100).await.expect("pending");
    assert_eq!(all.iter().map(|o| o.to_string()).collect::<Vec<_>>(), want, "one page");
    let (mut paged, mut after) = (Vec::new(), None);
    while let Some(next) = fx.hot.objects_with_pending_changes(after.as_ref(), 1).await.expect("page").pop() {
        assert!(paged.len() < ids.len(), "paging never ends: {paged:?}");
        paged.push(next.to_string());
        after = Some(next);
    }
    assert_eq!(paged, want, "one object per page");
}

/// Tokens strictly increase across holders, releases and expiry.
pub async fn tokens_strictly_increase_across_holders(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let mut last = FencingToken::NONE;
    for i in 0..6 {
        let l = lease(&fx, "o1", &format!("n{}", i % 3)).await;
        assert!(l.token > last, "token {} after {}", l.token, last);
        last = l.token;
        if i % 2 == 0 {
            fx.guard.release(&l).await.expect("release");
        } else {
            clock.advance(TTL);
        }
    }
}

/// A lease taken over raises the token the store reports (`ObjectInfo::max_token` counts tokens
/// its co-located guard issued) before the new holder writes anything, and the old holder's
/// token is refused at once.
pub async fn a_takeover_raises_the_reported_token_before_any_write(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let l1 = lease(&fx, "o1", "n1").await;
    fx.hot.put(&l1.object, l1.token, "T", "k", b("v1")).await.expect("put");
    clock.advance(TTL);
    let l2 = lease(&fx, "o1", "n2").await;
    let info = fx.hot.object_info(&l1.object).await.expect("info").expect("written");
    assert_eq!(info.max_token, l2.token, "the new lease's token, before it wrote");
    let e = fx.hot.put(&l1.object, l1.token, "T", "k", b("late")).await.expect_err("old token");
    assert!(e.is_fenced(), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    fx.guard.release(&l2).await.expect("release");
    let info = fx.hot.object_info(&l1.object).await.expect("info").expect("written");
    assert_eq!(info.max_token, l2.token, "a release keeps the token maximum");
}

/// Validate, refresh, release and current on an object that was never leased: validate and
/// refresh are `LeaseLost` (no newer token exists), release is a no-op `Ok`, current is `None`,
/// and the object can be acquired afterwards.
pub async fn guard_calls_on_an_object_never_leased(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let o = oid("never-leased");
    let now = clock.now();
    let forged = Lease {
        object: o.clone(),
        holder: nid("n1"),
        token: FencingToken::new(1),
        acquired_at: now,
        expires_at: now.plus(TTL),
    };
    let e = fx.guard.validate(&forged).await.expect_err("no lease");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "validate: {e}");
    let e = fx.guard.refresh(&forged, TTL).await.expect_err("no lease");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "refresh: {e}");
    fx.guard.release(&forged).await.expect("nothing to release is a no-op");
    assert_eq!(fx.guard.current(&o).await.expect("current"), None);
    assert!(fx.guard.is_available(&o).await.expect("available"));
    let l = lease(&fx, "never-leased", "n1").await;
    fx.guard.validate(&l).await.expect("the lease acquired afterwards is current");
}

/// Refresh extends the expiry and keeps the token.
pub async fn refresh_extends_and_keeps_token(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    clock.advance(TTL / 2);
    let r = fx.guard.refresh(&l, TTL).await.expect("refresh");
    assert_eq!(r.token, l.token);
    assert_eq!(r.acquired_at, l.acquired_at);
    assert_eq!(r.expires_at, clock.now().plus(TTL));
    // A lease passed in is its object, holder and token: the answer carries the stored grant
    // time, not the caller's (dotdo-sqlite and dotdo-libsql echoed the caller's).
    let other_times =
        Lease { acquired_at: l.acquired_at.plus(TTL * 5), expires_at: l.expires_at.plus(TTL * 5), ..l.clone() };
    let again = fx.guard.refresh(&other_times, TTL).await.expect("refresh with other times");
    assert_eq!((again.token, again.acquired_at, again.expires_at), (l.token, l.acquired_at, r.expires_at));
    // Others are told the extended expiry.
    let e = fx.guard.acquire(&l.object, &nid("n2"), TTL).await.expect_err("held");
    match e.kind() {
        ErrorKind::LeaseHeld { holder, expires_at, .. } => {
            assert_eq!((holder, *expires_at), (&l.holder, r.expires_at), "{e}");
        }
        other => panic!("expected LeaseHeld, got {other:?}"),
    }
    clock.advance(TTL * 3 / 4);
    // Without the refresh this would have expired.
    assert!(!fx.guard.is_available(&l.object).await.expect("available"));
    fx.guard.validate(&r).await.expect("still valid");
    fx.hot.put(&l.object, r.token, "T", "k", b("v")).await.expect("write after refresh");
}

/// A refresh, validate or release sent again with the lease as it was before a refresh whose
/// reply was lost (the runtime keeps the lease it was granted and sends the same call again)
/// is answered as for the holder's current lease of that token, past the old expiry: a guard
/// that matched the caller's `expires_at` answered `LeaseLost`, and the runtime gave the object
/// up.
pub async fn calls_with_the_lease_from_before_a_refresh_still_hold(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    clock.advance(TTL / 2);
    let r = fx.guard.refresh(&l, TTL).await.expect("refresh");
    // Past the old expiry, within the new one.
    clock.advance(TTL * 3 / 4);
    assert!(clock.now() > l.expires_at && clock.now() < r.expires_at);
    fx.guard.validate(&l).await.expect("the same lease, renewed");
    let again = fx.guard.refresh(&l, TTL).await.expect("a refresh sent again with the lease from before");
    assert_eq!(again.token, l.token);
    assert_eq!(again.expires_at, clock.now().plus(TTL));
    fx.guard.release(&l).await.expect("a release with the lease from before");
    assert!(fx.guard.is_available(&l.object).await.expect("available"), "released");
    let next = lease(&fx, "o1", "n2").await;
    assert!(next.token > l.token);
}

/// Refresh after expiry is `LeaseLost`; after a takeover it is `Fenced`.
pub async fn refresh_after_expiry_or_takeover_fails(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    clock.advance(TTL);
    let e = fx.guard.refresh(&l, TTL).await.expect_err("expired");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    let n = lease(&fx, "o1", "n2").await;
    let e = fx.guard.refresh(&l, TTL).await.expect_err("taken over");
    assert!(e.is_fenced(), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    assert_eq!(fx.guard.current(&l.object).await.expect("current"), Some(n));
}

/// Release frees the object at once; releasing a stale lease never frees the newer one.
pub async fn release_is_idempotent_and_never_frees_a_newer_lease(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    fx.guard.release(&l).await.expect("release");
    fx.guard.release(&l).await.expect("release twice");
    assert!(fx.guard.is_available(&l.object).await.expect("available"));
    let e = fx.guard.validate(&l).await.expect_err("released");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }));
    // A released lease is not brought back by a refresh (its holder gave it up; another node
    // may be taking the object).
    let e = fx.guard.refresh(&l, TTL).await.expect_err("released");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }) || e.is_fenced(), "{e}");
    assert!(fx.guard.is_available(&l.object).await.expect("available"), "still free after the refresh");
    let n = lease(&fx, "o1", "n2").await;
    assert!(n.token > l.token);
    fx.guard.release(&l).await.expect("stale release is a no-op");
    assert_eq!(fx.guard.current(&l.object).await.expect("current"), Some(n.clone()));
    // A token above the current one was never issued: releasing it frees nothing.
    let forged = Lease { token: FencingToken::new(n.token.get() + 1), ..n.clone() };
    fx.guard.release(&forged).await.expect("a release of a token that is not current is a no-op");
    assert_eq!(fx.guard.current(&l.object).await.expect("current"), Some(n.clone()));
    clock.advance(Duration::from_millis(1));
    fx.guard.validate(&n).await.expect("newer lease still valid");
}

/// A release frees the object at once for every node whatever its clock: also for a clock
/// that reads before 1970 (a simulation's, a test's). A release that wrote the Unix epoch as the
/// expiry left the object held on such a clock (`now < 0`), and one whose lease ran out before
/// the epoch was not released at all.
pub async fn a_release_frees_the_object_on_a_clock_before_the_epoch(f: &HotFactory) {
    let clock = ManualClock::new(Timestamp::from_micros(-10_000_000));
    let fx = f(clock.clone()).await;
    for (obj, ttl) in [("o1", Duration::from_secs(60)), ("o2", Duration::from_secs(5))] {
        let l = fx.guard.acquire(&oid(obj), &nid("n1"), ttl).await.expect("acquire");
        fx.guard.release(&l).await.expect("release");
        assert_eq!(fx.guard.current(&l.object).await.expect("current"), None, "{obj}");
        let e = fx.guard.validate(&l).await.expect_err("released");
        assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{obj}: {e}");
        let n = fx.guard.acquire(&oid(obj), &nid("n2"), ttl).await.expect("free for another node");
        assert!(n.token > l.token);
        fx.guard.validate(&n).await.expect("the new lease holds");
    }
}

/// Validate: `Ok` for the current lease, `Fenced` after a takeover, `LeaseLost` after expiry.
pub async fn validate_reports_current_fenced_and_lost(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    fx.guard.validate(&l).await.expect("current");
    clock.advance(TTL);
    assert!(matches!(fx.guard.validate(&l).await.expect_err("expired").kind(), ErrorKind::LeaseLost { .. }));
    let n = lease(&fx, "o1", "n2").await;
    assert!(fx.guard.validate(&l).await.expect_err("fenced").is_fenced());
    // The current token under another holder's name is not that holder's lease.
    let forged = Lease { holder: nid("n9"), ..n.clone() };
    let e = fx.guard.validate(&forged).await.expect_err("forged holder");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    let e = fx.guard.refresh(&forged, TTL).await.expect_err("forged holder");
    assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{e}");
    // A token no guard ever issues (above `FencingToken::MAX`, as a hand-built lease may carry):
    // not the current lease either, and nothing to release.
    for token in [FencingToken::new(FencingToken::MAX.get() + 1), FencingToken::new(u64::MAX)] {
        let never = Lease { token, ..n.clone() };
        let e = fx.guard.validate(&never).await.expect_err("never issued");
        assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{token}: {e}");
        let e = fx.guard.refresh(&never, TTL).await.expect_err("never issued");
        assert!(matches!(e.kind(), ErrorKind::LeaseLost { .. }), "{token}: {e}");
        fx.guard.release(&never).await.expect("nothing to release");
    }
    assert_eq!(fx.guard.current(&n.object).await.expect("current"), Some(n.clone()), "unchanged");
}

/// TTLs of zero or over a day are `InvalidInput`; exactly `MIN_TTL` and `MAX_TTL` are valid.
pub async fn invalid_ttl_is_rejected(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    for ttl in [Duration::ZERO, Duration::from_secs(25 * 3600)] {
        let e = fx.guard.acquire(&oid("o1"), &nid("n1"), ttl).await.expect_err("bad ttl");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{ttl:?}");
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    }
    assert!(fx.guard.is_available(&oid("o1")).await.expect("available"));
    let l = lease(&fx, "o1", "n1").await;
    for ttl in [Duration::ZERO, Duration::from_secs(25 * 3600)] {
        let e = fx.guard.refresh(&l, ttl).await.expect_err("bad ttl");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput, "refresh {ttl:?}");
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    }
    assert_eq!(fx.guard.current(&l.object).await.expect("current"), Some(l.clone()), "unchanged");
    let e = fx.guard.acquire(&oid("o2"), &nid("n1"), crate::guard::MAX_TTL + Duration::from_millis(1)).await;
    assert_eq!(e.expect_err("just over MAX_TTL").kind(), &ErrorKind::InvalidInput);
    let short = fx.guard.acquire(&oid("o2"), &nid("n1"), crate::guard::MIN_TTL).await.expect("MIN_TTL is valid");
    let long = fx.guard.refresh(&short, crate::guard::MAX_TTL).await.expect("MAX_TTL is valid");
    assert_eq!((long.token, long.expires_at), (short.token, clock.now().plus(crate::guard::MAX_TTL)));
}

/// A holder's earlier lease is not its current one: after it expired (or was released) and the
/// same holder acquired again, validate and refresh of the earlier lease are `Fenced`, its
/// release frees nothing, and its token writes nothing. (A guard that finds the lease by object
/// and holder alone, not by token, passes every case that switches holders.)
pub async fn an_earlier_lease_of_the_same_holder_is_not_current(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let first = lease(&fx, "o1", "n1").await;
    clock.advance(TTL);
    let second = lease(&fx, "o1", "n1").await;
    assert!(second.token > first.token, "{second:?} after {first:?}");
    fx.guard.release(&second).await.expect("release");
    let third = lease(&fx, "o1", "n1").await;
    assert!(third.token > second.token, "{third:?} after {second:?}");
    for earlier in [&first, &second] {
        let e = fx.guard.validate(earlier).await.expect_err("an earlier lease");
        assert!(e.is_fenced(), "validate {}: {e}", earlier.token);
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
        let e = fx.guard.refresh(earlier, TTL).await.expect_err("an earlier lease");
        assert!(e.is_fenced(), "refresh {}: {e}", earlier.token);
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
        fx.guard.release(earlier).await.expect("releasing an earlier lease is a no-op");
        let e = fx.hot.put(&earlier.object, earlier.token, "T", "k", b("stale")).await.expect_err("stale");
        assert!(e.is_fenced(), "put {}: {e}", earlier.token);
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    }
    assert_eq!(fx.guard.current(&third.object).await.expect("current"), Some(third.clone()));
    assert!(!fx.guard.is_available(&third.object).await.expect("available"));
    fx.guard.validate(&third).await.expect("the newest lease is current");
    assert_eq!(fx.hot.get(&third.object, "k").await.expect("get"), None);
}

/// Refresh sets the expiry to `now + ttl`, also when that is sooner than the lease's expiry:
/// a holder that shortens its lease frees the object when the shorter lease ends.
pub async fn refresh_can_shorten_a_lease(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let short = fx.guard.refresh(&l, crate::guard::MIN_TTL).await.expect("refresh to MIN_TTL");
    assert_eq!((short.token, short.expires_at), (l.token, clock.now().plus(crate::guard::MIN_TTL)));
    assert_eq!(fx.guard.current(&l.object).await.expect("current"), Some(short.clone()));
    clock.advance(crate::guard::MIN_TTL);
    assert!(fx.guard.is_available(&l.object).await.expect("available"), "the shortened lease ended");
    let n = lease(&fx, "o1", "n2").await;
    assert!(n.token > l.token);
}

/// Objects whose ids share a prefix, or whose id and key joined with a separator would
/// collide, are independent on every path: state, listing, change log, counts, truncation,
/// eviction and pending changes. (A backend keying rows by `object + "/" + key`, or selecting
/// an object's rows with a prefix match, mixes them.)
pub async fn objects_whose_ids_share_a_prefix_are_independent(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let long = format!("o1{}", "x".repeat(crate::ObjectId::MAX_LEN - 2));
    let ids = ["o1", "o10", "o1/x", "o1:x", "o1.x", "o1@x", "o", long.as_str()];
    let mut leases = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let l = lease(&fx, id, "n1").await;
        // Keys that, joined to the id with a separator, name another object's key.
        let batch = (0..=i).fold(WriteBatch::new("T"), |batch, j| batch.put(format!("k{j}"), b(&format!("{id}={j}"))));
        fx.hot.write(&l.object, l.token, batch.put("x/k", b(id)).put("0", b(id))).await.expect("write");
        leases.push(l);
    }
    let keys = |v: Vec<crate::Entry>| v.into_iter().map(|e| e.key).collect::<Vec<_>>();
    let check = |i: usize, truncated: bool, evicted: bool| {
        let (fx, l, id) = (&fx, &leases[i], ids[i]);
        async move {
            let n = i as u64 + 3;
            let mut want: Vec<String> = (0..=i).map(|j| format!("k{j}")).chain(["0".into(), "x/k".into()]).collect();
            want.sort();
            let listed = keys(fx.hot.list(&l.object, KeyRange::all(), None).await.expect("list"));
            assert_eq!(listed, if evicted { Vec::new() } else { want }, "{id}");
            let got = fx.hot.get(&l.object, "x/k").await.expect("get");
            assert_eq!(got, (!evicted).then(|| b(id)), "{id}");
            let log = changes(&*fx.hot, &l.object, 0, 100).await.expect("log");
            assert_eq!(log.len() as u64, if truncated { 0 } else { n }, "{id}");
            assert!(log.iter().all(|r| r.object == l.object), "{id}: another object's change");
            let info = fx.hot.object_info(&l.object).await.expect("info").expect("exists");
            assert_eq!(info.last_seq, n, "{id}");
            assert_eq!(info.keys, if evicted { 0 } else { n }, "{id}");
            assert_eq!(info.truncated_through, if truncated { n } else { 0 }, "{id}");
        }
    };
    for i in 0..ids.len() {
        check(i, false, false).await;
    }
    let pending = fx.hot.objects_with_pending_changes(None, 100).await.expect("pending");
    assert_eq!(pending.len(), ids.len(), "{pending:?}");
    // Truncate and evict "o1": nothing of the others moves.
    fx.hot.truncate_changes(&leases[0].object, leases[0].token, 3).await.expect("truncate o1");
    fx.hot.evict(&leases[0].object, leases[0].token).await.expect("evict o1");
    check(0, true, true).await;
    for i in 1..ids.len() {
        check(i, false, false).await;
    }
    let pending = fx.hot.objects_with_pending_changes(None, 100).await.expect("pending");
    assert_eq!(pending.len(), ids.len() - 1, "{pending:?}");
    assert!(!pending.contains(&leases[0].object), "{pending:?}");
    // A token of one object does not fence or raise another.
    let o10 = &leases[1];
    fx.hot.put(&o10.object, o10.token, "T", "after", b("1")).await.expect("o10 still writes under its own token");
}

/// Keys that differ only in case, in Unicode normalization form or in how UTF-16 would order
/// them stay distinct, read back as written and list in byte order; object ids that differ
/// only in case are separate objects (a case- or accent-insensitive collation, or one file per
/// key on a case-insensitive file system, would merge them; a UTF-16 sort would misorder them).
pub async fn keys_and_ids_differing_only_in_case_or_form_stay_distinct(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let upper = lease(&fx, "Ab", "n1").await;
    let keys = ["k", "K", "\u{e9}", "e\u{301}", "\u{df}", "ss", "\u{fffd}", "\u{1f600}", "a", "B"];
    let batch = keys.iter().fold(WriteBatch::new("T"), |batch, k| batch.put(*k, b(&format!("v-{k}"))));
    fx.hot.write(&upper.object, upper.token, batch).await.expect("write");
    for k in keys {
        assert_eq!(fx.hot.get(&upper.object, k).await.expect("get"), Some(b(&format!("v-{k}"))), "{k:?}");
    }
    let listed: Vec<String> =
        fx.hot.list(&upper.object, KeyRange::all(), None).await.expect("list").into_iter().map(|e| e.key).collect();
    let mut in_byte_order: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    in_byte_order.sort();
    assert_eq!(listed, in_byte_order, "every key, in byte order");
    // "ab" is another object: its own lease, its own state and log.
    let lower = lease(&fx, "ab", "n1").await;
    fx.hot.put(&lower.object, lower.token, "T", "k", b("lower")).await.expect("put");
    assert_eq!(fx.hot.get(&upper.object, "k").await.expect("get"), Some(b("v-k")));
    assert_eq!(fx.hot.list(&lower.object, KeyRange::all(), None).await.expect("list").len(), 1);
    assert_eq!(changes(&*fx.hot, &lower.object, 0, 100).await.expect("log").len(), 1);
    assert_eq!(changes(&*fx.hot, &upper.object, 0, 100).await.expect("log").len(), keys.len());
    fx.guard.validate(&upper).await.expect("the first object's lease is untouched");
}

/// A stale holder's evict, restore and truncation of a drained object that still has live state
/// are `Fenced` and change nothing (an evict that dropped the state before checking the token,
/// or a restore that replaced it, would pass a check on objects with pending changes only).
pub async fn stale_calls_on_a_drained_object_change_nothing(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let old = lease(&fx, "o1", "n1").await;
    fx.hot.write(&old.object, old.token, WriteBatch::new("T").put("a", b("1")).put("b", b("2"))).await.expect("w");
    fx.hot.truncate_changes(&old.object, old.token, 2).await.expect("drained");
    clock.advance(TTL * 2);
    let new = lease(&fx, "o1", "n2").await;
    let before = fx.hot.list(&old.object, KeyRange::all(), None).await.expect("list");
    let e = fx.hot.evict(&old.object, old.token).await.expect_err("stale evict");
    assert!(e.is_fenced(), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let entries = vec![crate::Entry { key: "z".into(), value: b("x"), seq: 2 }];
    let e = fx.hot.restore(&old.object, old.token, entries, 2).await.expect_err("stale restore");
    assert!(e.is_fenced(), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    let e = fx.hot.truncate_changes(&old.object, old.token, 2).await.expect_err("stale truncate");
    assert!(e.is_fenced(), "{e}");
    assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
    assert_eq!(fx.hot.list(&old.object, KeyRange::all(), None).await.expect("list"), before, "state unchanged");
    let info = fx.hot.object_info(&old.object).await.expect("info").expect("exists");
    assert_eq!((info.last_seq, info.truncated_through, info.keys), (2, 2, 2));
    let r = fx.hot.put(&new.object, new.token, "T", "c", b("3")).await.expect("the new holder writes");
    assert_eq!(r.first_seq, 3);
}

/// Of many concurrent acquires of one object exactly one wins.
pub async fn concurrent_acquire_has_one_winner(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let g = fx.guard.clone();
        tasks.push(tokio::spawn(async move { g.acquire(&oid("o1"), &nid(&format!("n{i}")), TTL).await }));
    }
    let (mut winners, mut held_by) = (Vec::new(), Vec::new());
    for t in tasks {
        match t.await.expect("task") {
            Ok(l) => winners.push(l),
            Err(e) => match e.kind() {
                ErrorKind::LeaseHeld { holder, .. } => held_by.push(holder.clone()),
                _ => assert!(e.is_retryable(), "{e}"),
            },
        }
    }
    assert_eq!(winners.len(), 1, "one holder, got {winners:?}");
    let w = winners.pop().expect("one winner");
    assert!(held_by.iter().all(|h| h == &w.holder), "losers saw {held_by:?}, winner {}", w.holder);
    assert_late_acquire_names(&fx, &w).await;
}

/// Once a race for `winner`'s object is over, `current` is the winner's lease and a late
/// acquire by another node is `LeaseHeld` naming the winner (a loser of the race may have been
/// told only "busy, retry"; this answer must name the holder).
async fn assert_late_acquire_names(fx: &HotFixture, winner: &Lease) {
    assert_eq!(fx.guard.current(&winner.object).await.expect("current"), Some(winner.clone()));
    match fx.guard.acquire(&winner.object, &nid("late"), TTL).await {
        Err(e) if matches!(e.kind(), ErrorKind::LeaseHeld { holder, .. } if *holder == winner.holder) => {}
        other => panic!("a late acquire must be LeaseHeld naming {}: {other:?}", winner.holder),
    }
}

/// Many nodes taking over an expired lease at once: exactly one wins, with a token above every
/// earlier one, and the others are told who holds it. The same after a release.
pub async fn concurrent_takeover_has_one_winner(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let mut last = lease(&fx, "o1", "n0").await;
    for round in 0..2 {
        if round == 0 {
            clock.advance(TTL + Duration::from_millis(1));
        } else {
            fx.guard.release(&last).await.expect("release");
        }
        let mut tasks = Vec::new();
        for i in 0..8 {
            let g = fx.guard.clone();
            let holder = nid(&format!("r{round}n{i}"));
            tasks.push(tokio::spawn(async move { g.acquire(&oid("o1"), &holder, TTL).await }));
        }
        let (mut winners, mut held_by) = (Vec::new(), Vec::new());
        for t in tasks {
            match t.await.expect("task") {
                Ok(l) => winners.push(l),
                Err(e) => match e.kind() {
                    ErrorKind::LeaseHeld { holder, .. } => held_by.push(holder.clone()),
                    _ => assert!(e.is_retryable(), "round {round}: {e}"),
                },
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: one new holder, got {winners:?}");
        let w = winners.pop().expect("one winner");
        assert!(w.token > last.token, "round {round}: token {} after {}", w.token, last.token);
        assert!(held_by.iter().all(|h| h == &w.holder), "round {round}: losers saw {held_by:?}, winner {}", w.holder);
        assert_late_acquire_names(&fx, &w).await;
        let e = fx.hot.put(&w.object, last.token, "T", "k", b("stale")).await.expect_err("the old holder");
        assert!(e.is_fenced(), "round {round}: {e}");
        assert!(!e.is_retryable(), "a refusal no retry can mend is not retryable: {e}");
        last = w;
    }
}

/// An evicted object restores at exactly the sequence number it was evicted at (the normal
/// evict → reactivate path), and writes continue after it.
pub async fn evicted_object_restores_at_its_sequence(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    fx.hot.write(&l.object, l.token, WriteBatch::new("T").put("a", b("1")).put("b", b("22"))).await.expect("w");
    fx.hot.truncate_changes(&l.object, l.token, 2).await.expect("truncate");
    fx.hot.evict(&l.object, l.token).await.expect("evict");
    let entries = vec![
        crate::Entry { key: "a".into(), value: b("1"), seq: 1 },
        crate::Entry { key: "b".into(), value: b("22"), seq: 2 },
    ];
    fx.hot.restore(&l.object, l.token, entries.clone(), 2).await.expect("restore at the evicted sequence");
    assert_eq!(fx.hot.list(&l.object, KeyRange::all(), None).await.expect("list"), entries);
    assert!(fx.hot.read_changes(&l.object, 0, 10).await.expect("log").is_empty(), "a restore logs nothing");
    let info = fx.hot.object_info(&l.object).await.expect("info").expect("exists");
    assert_eq!((info.last_seq, info.truncated_through, info.keys, info.value_bytes), (2, 2, 2, 3));
    let r = fx.hot.put(&l.object, l.token, "T", "c", b("3")).await.expect("put after the restore");
    assert_eq!(r.first_seq, 3);
}

/// An object whose keys were all deleted is resident (its empty state is its whole state); an
/// evicted one is not (its state is in cold storage), also once written again, until a
/// restore, an empty one included. A refused evict or restore changes nothing of it, and an
/// evict before any write marks nothing. (A backend reporting every keyless object resident
/// makes the runtime serve an evicted object empty; one reporting none makes it restore an
/// emptied object from cold at each activation.)
pub async fn an_evicted_object_is_told_from_an_emptied_one(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let keys_resident = |o: &ObjectId| {
        let hot = fx.hot.clone();
        let o = o.clone();
        async move { hot.object_info(&o).await.expect("info").map(|i| (i.keys, i.resident)) }
    };
    let l = lease(&fx, "o1", "n1").await;
    let o = &l.object;
    fx.hot.write(o, l.token, WriteBatch::new("T").put("a", b("1")).put("b", b("2"))).await.expect("w");
    assert_eq!(keys_resident(o).await, Some((2, true)), "written here");
    fx.hot.write(o, l.token, WriteBatch::new("T").delete("a").delete("b")).await.expect("delete all");
    fx.hot.truncate_changes(o, l.token, 4).await.expect("truncate");
    assert_eq!(keys_resident(o).await, Some((0, true)), "emptied by deletes: its whole state is empty");
    fx.hot.evict(o, l.token).await.expect("evict");
    assert_eq!(keys_resident(o).await, Some((0, false)), "evicted");
    fx.hot.write(o, l.token, WriteBatch::new("T")).await.expect("empty write");
    assert_eq!(keys_resident(o).await, Some((0, false)), "an empty write changes nothing of it");
    fx.hot.put(o, l.token, "T", "c", b("3")).await.expect("write after evict");
    assert_eq!(keys_resident(o).await, Some((1, false)), "hot holds only what was written since the evict");
    let e = fx.hot.restore(o, l.token, vec![], 5).await.expect_err("pending change");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert_eq!(keys_resident(o).await, Some((1, false)), "a refused restore changes nothing");
    fx.hot.delete(o, l.token, "T", "c").await.expect("delete");
    fx.hot.truncate_changes(o, l.token, 6).await.expect("truncate");
    assert_eq!(keys_resident(o).await, Some((0, false)), "still evicted");
    fx.hot.restore(o, l.token, vec![], 6).await.expect("restore of an empty state");
    assert_eq!(keys_resident(o).await, Some((0, true)), "restored");
    // A refused evict (changes not yet in cold) marks nothing.
    let m = lease(&fx, "o2", "n1").await;
    fx.hot.put(&m.object, m.token, "T", "a", b("1")).await.expect("put");
    fx.hot.delete(&m.object, m.token, "T", "a").await.expect("delete");
    let e = fx.hot.evict(&m.object, m.token).await.expect_err("undrained");
    assert_eq!(e.kind(), &ErrorKind::Conflict, "{e}");
    assert_eq!(keys_resident(&m.object).await, Some((0, true)), "a refused evict changes nothing");
    // An evict before any write marks nothing: there is nothing in cold storage to restore, and
    // no restore would come to clear a mark (the object, written and emptied later, would
    // look evicted for good).
    let n = lease(&fx, "o3", "n1").await;
    fx.hot.evict(&n.object, n.token).await.expect("evict of an object never written");
    fx.hot.put(&n.object, n.token, "T", "a", b("1")).await.expect("put");
    fx.hot.delete(&n.object, n.token, "T", "a").await.expect("delete");
    fx.hot.truncate_changes(&n.object, n.token, 2).await.expect("truncate");
    assert_eq!(keys_resident(&n.object).await, Some((0, true)), "never evicted with anything to restore");
}

/// Keys of exactly 1 KiB (also in multi-byte characters) and type names of exactly 256 bytes are
/// accepted, stored whole and kept apart: a backend that cut them short would merge keys.
pub async fn keys_and_type_names_at_the_limit_stay_distinct(f: &HotFactory) {
    let (fx, _) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    let keys = [
        "a".repeat(crate::MAX_KEY_BYTES),
        format!("{}b", "a".repeat(crate::MAX_KEY_BYTES - 1)),
        "é".repeat(crate::MAX_KEY_BYTES / 2),
    ];
    let ty = "t".repeat(crate::ids::MAX_TYPE_NAME_BYTES);
    let batch =
        keys.iter().enumerate().fold(WriteBatch::new(ty.clone()), |w, (i, k)| w.put(k.clone(), b(&format!("v{i}"))));
    fx.hot.write(&l.object, l.token, batch).await.expect("keys and a type name at their limits");
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(fx.hot.get(&l.object, k).await.expect("get"), Some(b(&format!("v{i}"))), "key {i}");
    }
    let mut want: Vec<&str> = keys.iter().map(String::as_str).collect();
    want.sort_unstable();
    let listed = fx.hot.list(&l.object, KeyRange::all(), None).await.expect("list");
    assert_eq!(listed.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(), want);
    let log = changes(&*fx.hot, &l.object, 0, 10).await.expect("log");
    assert_eq!(
        log.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        keys.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(log.iter().all(|r| r.type_name == ty), "the type name is logged whole");
}

/// Change records carry the time of the write on the store's clock (cold storage keeps it, and
/// time-range scans filter on it).
pub async fn change_records_carry_the_write_time(f: &HotFactory) {
    let (fx, clock) = open(f).await;
    let l = lease(&fx, "o1", "n1").await;
    clock.advance(Duration::from_millis(1234));
    let t1 = clock.now();
    fx.hot.put(&l.object, l.token, "T", "a", b("1")).await.expect("put");
    // Timestamps have microsecond resolution: a store keeping milliseconds changes them.
    clock.advance(Duration::from_micros(1_000_037));
    let t2 = clock.now();
    fx.hot.write(&l.object, l.token, WriteBatch::new("T").put("b", b("2")).delete("a")).await.expect("batch");
    let log = changes(&*fx.hot, &l.object, 0, 10).await.expect("log");
    assert_eq!(log.iter().map(|r| r.timestamp).collect::<Vec<_>>(), [t1, t2, t2]);
}

// ---------------------------------------------------------------------------------------------
// Model-based property tests.

/// Operations of the hot-store state machine. Objects and keys come from small pools so that
/// sequences collide often.
#[derive(Clone, Debug)]
pub enum HotOp {
    /// Acquire a fresh lease after the previous one expired (a takeover).
    Takeover(usize),
    /// Write a batch under the current lease.
    Write(usize, Vec<(usize, Option<Vec<u8>>)>),
    /// Write with the previous (stale) token: must be fenced if a takeover happened.
    StaleWrite(usize, usize),
    /// Read one key.
    Get(usize, usize),
    /// List by prefix.
    List(usize, usize),
    /// Truncate the change log through `last_seq - n`.
    Truncate(usize, u64),
    /// Read the change log after `n`.
    ReadChanges(usize, u64),
    /// Evict: `Conflict` while changes are pending, else the state goes (the sequence stays).
    Evict(usize),
    /// Restore the live state without one key (`Conflict` while changes are pending).
    Restore(usize, usize),
    /// List the objects with pending changes.
    Pending,
}

const OBJS: usize = 3;
const KEYS: [&str; 5] = ["a", "ab", "b", "b/1", "c"];
const PREFIXES: [&str; 3] = ["a", "b", ""];

/// The model: per object, live map, the full change log, and which lease generation is current.
#[derive(Clone, Debug, Default)]
pub struct HotModel {
    objects: Vec<ObjModel>,
}

#[derive(Clone, Debug, Default)]
struct ObjModel {
    state: BTreeMap<String, Vec<u8>>,
    log: Vec<(u64, String, Option<Vec<u8>>)>,
    last_seq: u64,
    truncated: u64,
    generations: usize,
    /// Evicted and not restored since.
    evicted: bool,
}

struct HotMachine;

impl ReferenceStateMachine for HotMachine {
    type State = HotModel;
    type Transition = HotOp;

    fn init_state() -> BoxedStrategy<HotModel> {
        Just(HotModel { objects: vec![ObjModel::default(); OBJS] }).boxed()
    }

    fn transitions(_: &HotModel) -> BoxedStrategy<HotOp> {
        let value = proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16));
        prop_oneof![
            1 => (0..OBJS).prop_map(HotOp::Takeover),
            5 => (0..OBJS, proptest::collection::vec((0..KEYS.len(), value), 0..4)).prop_map(|(o, ops)| HotOp::Write(o, ops)),
            1 => (0..OBJS, 0..KEYS.len()).prop_map(|(o, k)| HotOp::StaleWrite(o, k)),
            3 => (0..OBJS, 0..KEYS.len()).prop_map(|(o, k)| HotOp::Get(o, k)),
            2 => (0..OBJS, 0..PREFIXES.len()).prop_map(|(o, p)| HotOp::List(o, p)),
            1 => (0..OBJS, 0..3u64).prop_map(|(o, n)| HotOp::Truncate(o, n)),
            1 => (0..OBJS, 0..6u64).prop_map(|(o, n)| HotOp::ReadChanges(o, n)),
            1 => (0..OBJS).prop_map(HotOp::Evict),
            1 => (0..OBJS, 0..KEYS.len()).prop_map(|(o, k)| HotOp::Restore(o, k)),
            1 => Just(HotOp::Pending),
        ]
        .boxed()
    }

    fn apply(mut s: HotModel, t: &HotOp) -> HotModel {
        match t {
            HotOp::Takeover(o) => s.objects[*o].generations += 1,
            HotOp::Write(o, ops) => {
                let m = &mut s.objects[*o];
                for (k, v) in ops {
                    m.last_seq += 1;
                    match v {
                        Some(v) => m.state.insert(KEYS[*k].to_string(), v.clone()),
                        None => m.state.remove(KEYS[*k]),
                    };
                    m.log.push((m.last_seq, KEYS[*k].to_string(), v.clone()));
                }
            }
            HotOp::Truncate(o, n) => {
                let m = &mut s.objects[*o];
                let through = m.last_seq.saturating_sub(*n);
                m.truncated = m.truncated.max(through);
                m.log.retain(|(seq, _, _)| *seq > m.truncated);
            }
            HotOp::Evict(o) => {
                let m = &mut s.objects[*o];
                if m.last_seq == m.truncated {
                    m.state.clear();
                    m.evicted = m.last_seq > 0;
                }
            }
            HotOp::Restore(o, k) => {
                let m = &mut s.objects[*o];
                if m.last_seq == m.truncated {
                    m.state.remove(KEYS[*k]);
                    m.evicted = false;
                }
            }
            HotOp::StaleWrite(..) | HotOp::Get(..) | HotOp::List(..) | HotOp::ReadChanges(..) | HotOp::Pending => {}
        }
        s
    }
}

/// Random sequences of writes, stale writes, takeovers, reads, listings, truncations, evictions,
/// restores and pending-object listings match the model, down to each object's truncation point
/// and value bytes.
pub fn prop_hot_store_matches_model(f: &HotFactory) {
    let rt = runtime();
    let mut runner =
        TestRunner::new(Config { cases: proptest_cases(), failure_persistence: None, ..Config::default() });
    let result = runner.run(&HotMachine::sequential_strategy(1..40), |(init, ops, _)| {
        rt.block_on(async {
            let clock = ManualClock::new(KIT_EPOCH);
            let fx = f(clock.clone()).await;
            let mut model = init;
            let objs: Vec<_> = (0..OBJS).map(|i| oid(&format!("p{i}"))).collect();
            let mut leases: Vec<Vec<Lease>> = vec![Vec::new(); OBJS];
            for (i, o) in objs.iter().enumerate() {
                leases[i].push(fx.guard.acquire(o, &nid("n0"), TTL).await.map_err(fail)?);
            }
            for op in &ops {
                match op {
                    HotOp::Takeover(o) => {
                        // Only this object's lease expires: the others are renewed first past
                        // the moment it does (a renewal keeps the token), then time moves on.
                        let target = leases[*o].last().cloned().expect("one lease per object");
                        let wait = target.expires_at.since(clock.now()) + Duration::from_millis(1);
                        for (j, ls) in leases.iter_mut().enumerate() {
                            if j != *o {
                                let cur = ls.last().cloned().expect("one lease per object");
                                let fresh = fx.guard.refresh(&cur, wait + TTL).await.map_err(fail)?;
                                prop_assert_eq!(fresh.token, cur.token, "a renewal keeps the token");
                                ls.push(fresh);
                            }
                        }
                        clock.advance(wait);
                        let l = fx.guard.acquire(&objs[*o], &nid("n1"), TTL).await.map_err(fail)?;
                        prop_assert!(l.token > target.token, "token did not increase");
                        leases[*o].push(l);
                    }
                    HotOp::Write(o, kv) => {
                        let l = leases[*o].last().expect("lease");
                        let mut batch = WriteBatch::new("T");
                        for (k, v) in kv {
                            batch = match v {
                                Some(v) => batch.put(KEYS[*k], Bytes::from(v.clone())),
                                None => batch.delete(KEYS[*k]),
                            };
                        }
                        let before = model.objects[*o].last_seq;
                        let r = fx.hot.write(&objs[*o], l.token, batch).await.map_err(fail)?;
                        prop_assert_eq!(r.first_seq, before + 1);
                        prop_assert_eq!(r.last_seq, before + kv.len() as u64);
                    }
                    HotOp::StaleWrite(o, k) => {
                        let ls = &leases[*o];
                        let current = ls.last().expect("lease").token;
                        // The newest token below the current one (the tightest stale token);
                        // none before the object's first takeover.
                        if let Some(stale) = ls.iter().rev().map(|l| l.token).find(|t| *t < current) {
                            let e = fx.hot.put(&objs[*o], stale, "T", KEYS[*k], Bytes::from_static(b"stale")).await;
                            prop_assert!(e.as_ref().is_err_and(|e| e.is_fenced()), "stale write not fenced: {:?}", e);
                        }
                    }
                    HotOp::Get(o, k) => {
                        let got = fx.hot.get(&objs[*o], KEYS[*k]).await.map_err(fail)?;
                        let want = model.objects[*o].state.get(KEYS[*k]).cloned();
                        prop_assert_eq!(got.map(|b| b.to_vec()), want);
                    }
                    HotOp::List(o, p) => {
                        let got: Vec<(String, Vec<u8>)> = fx
                            .hot
                            .list(&objs[*o], KeyRange::prefix(PREFIXES[*p]), None)
                            .await
                            .map_err(fail)?
                            .into_iter()
                            .map(|e| (e.key, e.value.to_vec()))
                            .collect();
                        let want: Vec<(String, Vec<u8>)> = model.objects[*o]
                            .state
                            .iter()
                            .filter(|(k, _)| k.starts_with(PREFIXES[*p]))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        prop_assert_eq!(got, want);
                    }
                    HotOp::Truncate(o, n) => {
                        let l = leases[*o].last().expect("lease");
                        let through = model.objects[*o].last_seq.saturating_sub(*n);
                        fx.hot.truncate_changes(&objs[*o], l.token, through).await.map_err(fail)?;
                    }
                    HotOp::ReadChanges(o, after) => {
                        let got: Vec<(u64, String, Option<Vec<u8>>)> = changes(&*fx.hot, &objs[*o], *after, 1000)
                            .await
                            .map_err(fail)?
                            .into_iter()
                            .map(|c| (c.seq, c.key, (c.op == Op::Put).then(|| c.value.to_vec())))
                            .collect();
                        let want: Vec<_> =
                            model.objects[*o].log.iter().filter(|(s, _, _)| s > after).cloned().collect();
                        prop_assert_eq!(got, want);
                    }
                    HotOp::Evict(o) => {
                        let l = leases[*o].last().expect("lease");
                        let m = &model.objects[*o];
                        let r = fx.hot.evict(&objs[*o], l.token).await;
                        if m.last_seq > m.truncated {
                            prop_assert!(r.as_ref().is_err_and(|e| e.kind() == &ErrorKind::Conflict), "{:?}", r);
                        } else {
                            r.map_err(fail)?;
                        }
                    }
                    HotOp::Restore(o, k) => {
                        let l = leases[*o].last().expect("lease");
                        let m = &model.objects[*o];
                        let entries: Vec<crate::Entry> = m
                            .state
                            .iter()
                            .filter(|(key, _)| key.as_str() != KEYS[*k])
                            .map(|(key, v)| crate::Entry {
                                key: key.clone(),
                                value: Bytes::from(v.clone()),
                                seq: m.last_seq,
                            })
                            .collect();
                        let r = fx.hot.restore(&objs[*o], l.token, entries, m.last_seq).await;
                        if m.last_seq > m.truncated {
                            prop_assert!(r.as_ref().is_err_and(|e| e.kind() == &ErrorKind::Conflict), "{:?}", r);
                        } else {
                            r.map_err(fail)?;
                        }
                    }
                    HotOp::Pending => {
                        let got = fx.hot.objects_with_pending_changes(None, 10).await.map_err(fail)?;
                        let want: Vec<_> = objs
                            .iter()
                            .zip(&model.objects)
                            .filter(|(_, m)| m.last_seq > m.truncated)
                            .map(|(o, _)| o.clone())
                            .collect();
                        prop_assert_eq!(got, want);
                    }
                }
                model = HotMachine::apply(model, op);
            }
            for (i, o) in objs.iter().enumerate() {
                let info = fx.hot.object_info(o).await.map_err(fail)?;
                let m = &model.objects[i];
                prop_assert_eq!(info.as_ref().map_or(0, |i| i.last_seq), m.last_seq);
                prop_assert_eq!(info.as_ref().map_or(0, |i| i.truncated_through), m.truncated);
                prop_assert_eq!(info.as_ref().map_or(0, |i| i.keys), m.state.len() as u64);
                let bytes: u64 = m.state.values().map(|v| v.len() as u64).sum();
                prop_assert_eq!(info.as_ref().map_or(0, |i| i.value_bytes), bytes);
                if let Some(info) = info {
                    prop_assert_eq!(info.resident, !m.evicted, "resident: {:?}", info);
                }
            }
            // Every case ends with a takeover of each object and a write under the token it
            // replaced (the tightest stale token), so that fencing never depends on the random
            // operations bringing a stale write up: refused, and nothing changed.
            let latest = leases.iter().map(|ls| ls.last().expect("lease").expires_at).max().expect("objects");
            clock.advance(latest.since(clock.now()) + Duration::from_millis(1));
            for (i, o) in objs.iter().enumerate() {
                let old = leases[i].last().expect("lease").token;
                let l = fx.guard.acquire(o, &nid("n2"), TTL).await.map_err(fail)?;
                prop_assert!(l.token > old, "token did not increase");
                let before = fx.hot.object_info(o).await.map_err(fail)?;
                let e = fx.hot.put(o, old, "T", KEYS[0], Bytes::from_static(b"stale")).await;
                prop_assert!(e.as_ref().is_err_and(|e| e.is_fenced()), "stale write not fenced: {:?}", e);
                prop_assert_eq!(fx.hot.object_info(o).await.map_err(fail)?, before, "a stale write changed {}", o);
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("hot store diverged from the model: {e}");
    }
}

fn fail(e: crate::Error) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// Operations of the guard state machine.
#[derive(Clone, Debug)]
pub enum GuardOp {
    /// Holder `h` tries to acquire object `o`.
    Acquire(usize, usize),
    /// Holder `h` refreshes its latest lease on `o`.
    Refresh(usize, usize),
    /// Holder `h` releases its latest lease on `o`.
    Release(usize, usize),
    /// Holder `h` validates its latest lease on `o`.
    Validate(usize, usize),
    /// Time passes (milliseconds).
    Advance(u64),
}

/// The guard model: per object the current holder, token and expiry (ms since kit epoch).
#[derive(Clone, Debug, Default)]
pub struct GuardModel {
    now: u64,
    objects: Vec<(Option<usize>, u64, u64)>,
    held: BTreeMap<(usize, usize), (u64, u64)>,
}

const HOLDERS: usize = 3;
const TTL_MS: u64 = 1_000;

struct GuardMachine;

impl ReferenceStateMachine for GuardMachine {
    type State = GuardModel;
    type Transition = GuardOp;

    fn init_state() -> BoxedStrategy<GuardModel> {
        Just(GuardModel { now: 0, objects: vec![(None, 0, 0); 2], held: BTreeMap::new() }).boxed()
    }

    fn transitions(_: &GuardModel) -> BoxedStrategy<GuardOp> {
        prop_oneof![
            3 => (0..2usize, 0..HOLDERS).prop_map(|(o, h)| GuardOp::Acquire(o, h)),
            2 => (0..2usize, 0..HOLDERS).prop_map(|(o, h)| GuardOp::Refresh(o, h)),
            1 => (0..2usize, 0..HOLDERS).prop_map(|(o, h)| GuardOp::Release(o, h)),
            2 => (0..2usize, 0..HOLDERS).prop_map(|(o, h)| GuardOp::Validate(o, h)),
            2 => prop_oneof![Just(1u64), Just(400), Just(999), Just(1_000), Just(2_500)].prop_map(GuardOp::Advance),
        ]
        .boxed()
    }

    fn apply(mut s: GuardModel, t: &GuardOp) -> GuardModel {
        let now = s.now;
        match *t {
            GuardOp::Acquire(o, h) => {
                let (_, token, exp) = s.objects[o];
                if now >= exp {
                    s.objects[o] = (Some(h), token + 1, now + TTL_MS);
                    s.held.insert((o, h), (token + 1, now + TTL_MS));
                }
            }
            GuardOp::Refresh(o, h) => {
                if let Some(&(tok, _)) = s.held.get(&(o, h)) {
                    let (holder, token, exp) = s.objects[o];
                    if holder == Some(h) && token == tok && now < exp {
                        s.objects[o].2 = now + TTL_MS;
                        s.held.insert((o, h), (tok, now + TTL_MS));
                    }
                }
            }
            GuardOp::Release(o, h) => {
                if let Some(&(tok, _)) = s.held.get(&(o, h)) {
                    let (_, token, exp) = s.objects[o];
                    if token == tok && now < exp {
                        s.objects[o].2 = now;
                    }
                }
            }
            GuardOp::Validate(..) => {}
            GuardOp::Advance(ms) => s.now += ms,
        }
        s
    }
}

/// Random acquire / refresh / release / validate / time sequences by several holders match the
/// lease model exactly: who holds what, which calls fail and how, and token values relative to
/// each other.
pub fn prop_guard_matches_model(f: &HotFactory) {
    let rt = runtime();
    let mut runner =
        TestRunner::new(Config { cases: proptest_cases(), failure_persistence: None, ..Config::default() });
    let result = runner.run(&GuardMachine::sequential_strategy(1..50), |(init, ops, _)| {
        rt.block_on(async {
            let clock = ManualClock::new(KIT_EPOCH);
            let fx = f(clock.clone()).await;
            let objs = [oid("g0"), oid("g1")];
            let holders: Vec<_> = (0..HOLDERS).map(|h| nid(&format!("h{h}"))).collect();
            let ttl = Duration::from_millis(TTL_MS);
            let mut model = init;
            let mut leases: BTreeMap<(usize, usize), Lease> = BTreeMap::new();
            let mut token_base: [Option<u64>; 2] = [None, None];
            for op in &ops {
                let next = GuardMachine::apply(model.clone(), op);
                match *op {
                    GuardOp::Acquire(o, h) => {
                        let r = fx.guard.acquire(&objs[o], &holders[h], ttl).await;
                        if next.objects[o].1 != model.objects[o].1 {
                            let l = r.map_err(fail)?;
                            // Tokens may start anywhere but must advance by exactly what the model says
                            // relative to the first one, or at least strictly increase.
                            let base = *token_base[o].get_or_insert(l.token.get() - next.objects[o].1 + 1);
                            prop_assert!(l.token.get() >= base + next.objects[o].1 - 1, "token went down");
                            if let Some(prev) = leases.values().filter(|x| x.object == objs[o]).map(|x| x.token).max() {
                                prop_assert!(l.token > prev, "token {} not above {}", l.token, prev);
                            }
                            leases.insert((o, h), l);
                        } else {
                            let e = r.expect_err("acquire of a held object must fail");
                            let holder = model.objects[o].0.expect("held objects have a holder");
                            match e.kind() {
                                ErrorKind::LeaseHeld { holder: got, .. } => prop_assert_eq!(got, &holders[holder]),
                                other => prop_assert!(false, "expected LeaseHeld, got {:?}", other),
                            }
                        }
                    }
                    GuardOp::Refresh(o, h) | GuardOp::Validate(o, h) => {
                        if let Some(l) = leases.get(&(o, h)).cloned() {
                            let valid = model.objects[o].0 == Some(h)
                                && model.held.get(&(o, h)).map(|x| x.0) == Some(model.objects[o].1)
                                && model.now < model.objects[o].2;
                            let r = if matches!(op, GuardOp::Refresh(..)) {
                                fx.guard.refresh(&l, ttl).await.map(|nl| {
                                    leases.insert((o, h), nl);
                                })
                            } else {
                                fx.guard.validate(&l).await
                            };
                            prop_assert_eq!(r.is_ok(), valid, "{:?} on {:?}: {:?}", op, l, r);
                            if let Err(e) = &r {
                                // A newer lease exists: Fenced; expired or released: LeaseLost.
                                match model.held.get(&(o, h)).map(|x| x.0) {
                                    Some(t) if model.objects[o].1 > t => {
                                        prop_assert!(e.is_fenced(), "{:?}: expected Fenced, got {}", op, e)
                                    }
                                    Some(_) => prop_assert!(
                                        matches!(e.kind(), ErrorKind::LeaseLost { .. }),
                                        "{:?}: expected LeaseLost, got {}",
                                        op,
                                        e
                                    ),
                                    None => prop_assert!(
                                        e.is_fenced() || matches!(e.kind(), ErrorKind::LeaseLost { .. }),
                                        "{:?}: {}",
                                        op,
                                        e
                                    ),
                                }
                            }
                        }
                    }
                    GuardOp::Release(o, h) => {
                        if let Some(l) = leases.get(&(o, h)) {
                            fx.guard.release(l).await.map_err(fail)?;
                        }
                    }
                    GuardOp::Advance(ms) => clock.advance(Duration::from_millis(ms)),
                }
                model = next;
                for (o, obj) in objs.iter().enumerate() {
                    let avail = fx.guard.is_available(obj).await.map_err(fail)?;
                    prop_assert_eq!(avail, model.now >= model.objects[o].2, "availability of {}", obj);
                    // Who holds it, under which token: the holder's latest lease.
                    if let (false, Some(h)) = (avail, model.objects[o].0) {
                        let cur = fx.guard.current(obj).await.map_err(fail)?;
                        let want = leases.get(&(o, h)).map(|l| (l.holder.clone(), l.token));
                        prop_assert_eq!(cur.map(|c| (c.holder, c.token)), want, "holder of {}", obj);
                    }
                }
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("guard diverged from the model: {e}");
    }
}

/// Run every hot case (and the property tests) and return the failures instead of panicking.
pub fn run_all(f: &HotFactory) -> Vec<CaseFailure> {
    macro_rules! cases {
        ($($c:ident),+ $(,)?) => { vec![$((stringify!($c), Box::new(|f: &HotFactory| runtime().block_on($c(f))) as Box<dyn Fn(&HotFactory)>)),+] };
    }
    let all = crate::__hot_cases!([cases]());
    let mut failures: Vec<CaseFailure> =
        all.into_iter().filter_map(|(name, case)| run_catching(name, || case(f))).collect();
    failures.extend(run_catching("prop_hot_store_matches_model", || prop_hot_store_matches_model(f)));
    failures.extend(run_catching("prop_guard_matches_model", || prop_guard_matches_model(f)));
    failures
}

/// Not a conformance case (a backend may return any number of changes per read): for backends
/// that bound `read_changes` by bytes (the SQL stores:
/// [`READ_CHANGES_BYTES`](crate::sql_schema::READ_CHANGES_BYTES)), check that one read returns at
/// most `bound` bytes of values and as many changes as fit, in order; that reading on from the
/// last change returned gives every change once; and that the row limit still applies.
pub async fn assert_change_reads_are_bounded_in_bytes<S>(store: &S, bound: usize)
where
    S: crate::HotStore + crate::ConsistencyGuard,
{
    let obj = oid("bounded-reads");
    let lease = store.acquire(&obj, &nid("n"), Duration::from_secs(3600)).await.expect("acquire");
    // 1.5 MiB values: a bound that is not a multiple of them shows whether the change that
    // crosses it is left out.
    let value = Bytes::from(vec![7u8; 1536 << 10]);
    let n = bound / value.len() + 3;
    for k in 0..n {
        store.put(&obj, lease.token, "T", &format!("k{k:02}"), value.clone()).await.expect("put");
    }
    let first = store.read_changes(&obj, 0, 1000).await.expect("read");
    let bytes: usize = first.iter().map(|c| c.value.len()).sum();
    assert_eq!(first.len(), bound / value.len(), "as many changes as fit in {bound} bytes, not the row limit");
    assert!(bytes <= bound, "{bytes} bytes of values in one read, over {bound}");
    let (mut seen, mut after) = (Vec::new(), 0);
    loop {
        let page = store.read_changes(&obj, after, 1000).await.expect("read on");
        let Some(last) = page.last() else { break };
        assert!(page.iter().map(|c| c.value.len()).sum::<usize>() <= bound);
        after = last.seq;
        seen.extend(page.iter().map(|c| c.seq));
    }
    assert_eq!(seen, (1..=n as u64).collect::<Vec<_>>(), "every change once, in order");
    let small = (0..50).fold(WriteBatch::new("T"), |b, k| b.put(format!("s{k}"), "v"));
    let r = store.write(&obj, lease.token, small).await.expect("small");
    assert_eq!(store.read_changes(&obj, r.first_seq - 1, 10).await.expect("read").len(), 10, "the row limit applies");
}
