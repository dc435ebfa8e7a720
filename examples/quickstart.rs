//! dotdo quickstart (placeholder until the runtime lands): leases, fenced writes and a cold flush
//! on the in-memory reference backends.

use std::time::Duration;

use dotdo_core::*;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let hot = MemoryBackend::new();
    let cold = MemoryColdStore::new();
    let obj = ObjectId::new("counter:1")?;
    let a = hot.acquire(&obj, &NodeId::new("node-a")?, Duration::from_millis(50)).await?;
    hot.put(&obj, a.token, "Counter", "n", "1".into()).await?;
    SystemClock::new().sleep(Duration::from_millis(60)).await;
    let b = hot.acquire(&obj, &NodeId::new("node-b")?, Duration::from_secs(10)).await?;
    let stale = hot.put(&obj, a.token, "Counter", "n", "stale".into()).await;
    println!("stale holder write: {}", stale.map_or_else(|e| e.to_string(), |_| "accepted?!".into()));
    let changes = hot.read_changes(&obj, 0, 1000).await?;
    let commit = cold.append(ColdBatch::single(obj.clone(), b.token, changes)).await?;
    println!("flushed {} change(s) to cold snapshot {:?}", commit.records_written, commit.snapshot);
    Ok(())
}
