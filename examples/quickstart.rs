//! dotdo quickstart on the embedded default: SQLite hot state + a local Iceberg warehouse.
//!
//! ```text
//! cargo run --release --example quickstart            # files in the workspace's target/dotdo-quickstart (warehouse/ inside)
//! DOTDO_QUICKSTART_DIR=/tmp/dd cargo run --release --example quickstart   # a new or empty directory
//! ```
//!
//! The directory is emptied on every run (the directory itself is kept); one that is not empty
//! and was not made by the quickstart (no `.dotdo-quickstart` marker in it) is refused rather
//! than emptied.
//!
//! It creates a few objects, runs handlers, shows a stale holder being fenced, flushes to cold
//! storage (Iceberg), evicts an object and restores it lazily and eagerly, reads an older
//! snapshot, and prints a report with timings. The Iceberg table it leaves behind is readable by
//! PyIceberg (SqlCatalog named "dotdo" on `<dir>/warehouse/catalog.db`, table `app.changes`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dotdo_core::runtime::{ObjectRuntime, ObjectTxn, RestoreMode, RuntimeSettings};
use dotdo_core::time::Stopwatch;
use dotdo_core::*;
use dotdo_iceberg::IcebergColdStore;
use dotdo_sqlite::SqliteStore;

/// The file the quickstart leaves in a directory it made (and may empty on its next run).
const MARKER: &str = ".dotdo-quickstart";

/// Make `dir` ready for a run and return it resolved. A directory the quickstart made (with its
/// marker) is emptied, never removed itself: it may be a mount point, or have its own owner and
/// permissions. A directory that is not empty and has no marker is refused, not touched.
fn prepare_dir(dir: &std::path::Path) -> Result<PathBuf> {
    let failed = |what: &str, e: std::io::Error| Error::unavailable(format!("{what} {}", dir.display())).with_source(e);
    std::fs::create_dir_all(dir).map_err(|e| failed("creating", e))?;
    // Resolved before the marker is looked for or written: the marker must be in the directory
    // that is emptied, whatever name (relative, through a link) the caller gave it.
    let dir = std::fs::canonicalize(dir).map_err(|e| failed("resolving", e))?;
    let marker = dir.join(MARKER);
    let entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .and_then(|d| d.map(|e| e.map(|e| e.path())).collect())
        .map_err(|e| failed("reading", e))?;
    if !entries.is_empty() && !marker.exists() {
        return Err(Error::invalid(format!(
            "{} is not empty and was not made by the quickstart; choose a new or empty directory",
            dir.display()
        )));
    }
    // The table's files of a warehouse whose path needs URL escaping (a space, '#', '%') are in
    // the percent-encoded twin of `warehouse/` (see "Local warehouse paths that need URL
    // escaping" in docs/iceberg-cold-store.md): removed with it if an earlier run marked it.
    let mut stale = entries;
    stale.extend(escaped_twin(&dir.join("warehouse")).filter(|t| t.join(MARKER).exists()));
    for path in stale.into_iter().filter(|p| *p != marker) {
        let removed = if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| Error::unavailable(format!("cleaning {}", path.display())).with_source(e))?;
    }
    std::fs::write(&marker, b"made by the dotdo quickstart; emptied on its next run\n")
        .map_err(|e| failed("marking", e))?;
    Ok(dir)
}

/// Where a local warehouse at `warehouse` keeps its table files if that is not `warehouse`
/// itself: the directory named by its `file://` URL's percent-encoded path.
fn escaped_twin(warehouse: &std::path::Path) -> Option<PathBuf> {
    let url = url::Url::from_directory_path(warehouse).ok()?;
    let twin = PathBuf::from(url.path());
    (twin.components().ne(warehouse.components())).then_some(twin)
}

struct Env {
    hot: SqliteStore,
    cold: IcebergColdStore,
    clock: Arc<dyn Clock>,
}

impl Env {
    fn runtime(&self, node: &str, restore: RestoreMode) -> Result<ObjectRuntime> {
        ObjectRuntime::builder(NodeId::new(node)?)
            .with_hot_store(Arc::new(self.hot.clone()))
            .with_guard(Arc::new(self.hot.clone()))
            .with_cold_sink(Arc::new(self.cold.clone()))
            .with_accelerator(Arc::new(self.cold.clone()))
            .with_clock(self.clock.clone())
            .with_settings(RuntimeSettings { restore, lease_ttl: Duration::from_secs(5), ..Default::default() })
            .build()
    }

    fn timed(&self) -> Stopwatch {
        Stopwatch::start(self.clock.clone())
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

async fn add_to_cart(rt: &ObjectRuntime, cart: &ObjectId, item: &str, qty: u32) -> Result<usize> {
    let item = item.to_string();
    rt.invoke_typed(cart, "Cart", async move |t: &mut ObjectTxn<'_>| {
        let key = format!("item/{item}");
        // A stored quantity that is not a number is an error, not 0 to overwrite.
        let have: u32 = match t.get(&key).await? {
            Some(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Error::corrupt(format!("{key} is not a quantity")))?,
            None => 0,
        };
        let total =
            have.checked_add(qty).ok_or_else(|| Error::invalid(format!("{key}: {have} + {qty} is too many")))?;
        t.put(key, total.to_string())?;
        Ok::<_, Error>(t.list(KeyRange::prefix("item/")).await?.len())
    })
    .await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // The workspace's target directory by default, wherever the command runs from (also for an
    // empty `DOTDO_QUICKSTART_DIR=`, which would otherwise name the working directory).
    let dir = std::env::var_os("DOTDO_QUICKSTART_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/dotdo-quickstart")));
    let dir = prepare_dir(&dir)?;
    let warehouse = dir.join("warehouse");
    std::fs::create_dir_all(&warehouse)
        .map_err(|e| Error::unavailable(format!("creating {}", warehouse.display())).with_source(e))?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let total = Stopwatch::start(clock.clone());

    println!(
        "dotdo quickstart — hot: SQLite ({}), cold: Iceberg ({})",
        dir.join("hot.db").display(),
        warehouse.display()
    );
    let twin = escaped_twin(&warehouse);
    // Only a twin this run creates is marked (one that was there and unmarked is someone's).
    let made_twin = twin.as_ref().filter(|t| !t.exists()).cloned();
    if let Some(twin) = &twin {
        println!("  (the path needs URL escaping: the table's files go to {})", twin.display());
    }
    if let Some(twin) = &made_twin {
        // Marked as the quickstart's, so that the next run may remove it (it never removes a
        // directory without its marker), before the store writes into it: an open that fails
        // or is interrupted leaves a marked directory, not one the next run must leave alone.
        std::fs::create_dir_all(twin)
            .and_then(|()| {
                std::fs::write(twin.join(MARKER), b"made by the dotdo quickstart; removed on its next run\n")
            })
            .map_err(|e| Error::unavailable(format!("marking {}", twin.display())).with_source(e))?;
    }
    let t = Stopwatch::start(clock.clone());
    let env = Env {
        hot: SqliteStore::builder(dir.join("hot.db")).open().await?,
        cold: IcebergColdStore::builder(warehouse.to_string_lossy()).table(["app"], "changes").build().await?,
        clock: clock.clone(),
    };
    println!("  opened stores                          {}", ms(t.elapsed()));

    // 1. Objects and handlers.
    let node_a = env.runtime("node-a", RestoreMode::Eager)?;
    let carts: Vec<ObjectId> = (1..=3).map(|i| ObjectId::new(format!("cart:{i}"))).collect::<Result<_>>()?;
    let t = env.timed();
    let mut calls = 0;
    for (i, cart) in carts.iter().enumerate() {
        for item in ["apple", "pear", "fig"].iter().take(i + 1) {
            add_to_cart(&node_a, cart, item, 2).await?;
            calls += 1;
        }
    }
    let items = add_to_cart(&node_a, &carts[2], "apple", 1).await?;
    calls += 1;
    println!(
        "1. {calls} handler calls on {} carts            {} (cart:3 now has {items} items)",
        carts.len(),
        ms(t.elapsed())
    );
    let t = env.timed();
    let n = 1000;
    for _ in 0..n {
        add_to_cart(&node_a, &carts[0], "apple", 1).await?;
    }
    println!(
        "   {n} warm invokes                      {} ({:.1} µs each)",
        ms(t.elapsed()),
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );

    // 2. Fencing: a holder that pauses past its TTL is fenced by the storage itself.
    let counter = ObjectId::new("counter:fencing-demo")?;
    let stale = env.hot.acquire(&counter, &NodeId::new("node-paused")?, Duration::from_millis(50)).await?;
    env.hot.put(&counter, stale.token, "Counter", "n", "1".into()).await?;
    clock.sleep(Duration::from_millis(60)).await; // the holder "pauses" (GC, network partition ...)
    let fresh = env.hot.acquire(&counter, &NodeId::new("node-b")?, Duration::from_secs(5)).await?;
    env.hot.put(&counter, fresh.token, "Counter", "n", "2".into()).await?;
    let late = env.hot.put(&counter, stale.token, "Counter", "n", "1-stale".into()).await;
    let fenced = late.as_ref().is_err_and(|e| e.is_fenced());
    println!(
        "2. paused holder (token {}) writes after node-b took over (token {}): {}",
        stale.token,
        fresh.token,
        match &late {
            Err(e) => format!("rejected — {e}"),
            Ok(_) => "ACCEPTED (bug!)".into(),
        }
    );
    assert!(fenced, "a stale write must be fenced");
    env.hot.release(&fresh).await?;

    // 3. Flush the change logs to Iceberg (exactly once, one snapshot for all objects).
    let t = env.timed();
    let report = node_a.flush_all().await?;
    let first_snapshot = env.cold.snapshots().await?.last().map(|s| s.id);
    println!(
        "3. flushed {} changes of {} objects (3 carts + the fencing demo's counter) in {} commit(s)  {}",
        report.records,
        report.objects,
        report.commits,
        ms(t.elapsed())
    );
    add_to_cart(&node_a, &carts[1], "kiwi", 5).await?;
    let report = node_a.flush_all().await?;
    println!(
        "   then 1 more change -> {} record(s), snapshot {:?}",
        report.records,
        env.cold.snapshots().await?.last().map(|s| s.id)
    );

    // 4. Evict cart:2 (tier out of hot storage) and bring it back on another node, lazily ...
    let before = node_a.invoke(&carts[1], async |t: &mut ObjectTxn<'_>| t.list(KeyRange::all()).await).await?;
    let t = env.timed();
    node_a.evict(&carts[1]).await?;
    println!("4. evicted cart:2 from hot storage         {}", ms(t.elapsed()));
    node_a.shutdown().await?;
    let lazy_node = env.runtime("node-lazy", RestoreMode::Lazy)?;
    let t = env.timed();
    let kiwi = lazy_node.invoke(&carts[1], async |t: &mut ObjectTxn<'_>| t.get("item/kiwi").await).await?;
    println!(
        "   lazy restore, first key on node-lazy   {} -> item/kiwi = {:?}",
        ms(t.elapsed()),
        kiwi.map(|b| String::from_utf8_lossy(&b).to_string())
    );
    let m = lazy_node.metrics();
    let act = m.recent_activations.back().cloned();
    lazy_node.evict(&carts[1]).await?;
    lazy_node.shutdown().await?;
    // ... and eagerly.
    let eager_node = env.runtime("node-eager", RestoreMode::Eager)?;
    let t = env.timed();
    let all = eager_node.invoke(&carts[1], async |t: &mut ObjectTxn<'_>| t.list(KeyRange::all()).await).await?;
    println!("   eager restore of {} keys on node-eager  {}", all.len(), ms(t.elapsed()));
    // Every key and value as before the eviction.
    assert_eq!(all, before, "the restored state must equal the state before eviction");
    println!("   restored state equals the state before eviction ({} keys)", before.len());
    if let (Some(a), Some(b)) = (act, eager_node.metrics().recent_activations.back()) {
        println!(
            "   recovery metrics: lazy cold-start {} ({:?}), eager cold-start {} ({} keys, {} bytes loaded)",
            ms(a.cold_start),
            a.recovery,
            ms(b.cold_start),
            b.keys_loaded,
            b.bytes_loaded
        );
    }
    eager_node.shutdown().await?;

    // 5. Time travel: cart:2 as of the first snapshot, through the index accelerator.
    if let Some(first) = first_snapshot {
        let t = env.timed();
        let old = env.cold.lookup(&carts[1], "item/kiwi", AsOf::Snapshot(first)).await?;
        let now = env.cold.lookup(&carts[1], "item/kiwi", AsOf::Latest).await?;
        println!(
            "5. item/kiwi of cart:2 as of snapshot {first}: {:?}; latest: {:?}  {} ({} of {} files opened)",
            old.value.map(|v| String::from_utf8_lossy(&v.value).to_string()),
            now.value.map(|v| String::from_utf8_lossy(&v.value).to_string()),
            ms(t.elapsed()),
            now.stats.files_opened,
            now.stats.files_total
        );
    }
    let snaps = env.cold.snapshots().await?;
    println!(
        "done in {} — {} Iceberg snapshots in {} (PyIceberg: SqlCatalog(\"dotdo\", uri=\"sqlite:///{}\"), table app.changes)",
        ms(total.elapsed()),
        snaps.len(),
        warehouse.display(),
        warehouse.join("catalog.db").display()
    );
    Ok(())
}
