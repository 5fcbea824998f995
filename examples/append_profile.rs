//! The store's commit path alone, for callgrind: 30,000 one-event appends
//! from 1,024 tasks over 10,000 streams on a fresh `Durability::Fsync`
//! store, then the store's counters. Run it under callgrind with one output
//! file per thread, and divide the writer thread's instructions (the file
//! whose functions include `Writer::run`) by 30,000:
//!
//! ```text
//! cargo build --release --example append_profile
//! valgrind --tool=callgrind --separate-threads=yes \
//!     target/release/examples/append_profile
//! ```
//!
//! docs/design.md ("Tree `log`") and the README ("How fast") quote its
//! counts for formats 2, 3 and 4.

use std::error::Error;
use std::sync::Arc;

use annals::{EventStore, ExpectedVersion, NewEvent, SledStore, StreamId};

/// Appends in all.
const APPENDS: u64 = 30_000;
/// Concurrent appenders.
const TASKS: u64 = 1_024;
/// Streams the appends spread over.
const STREAMS: u64 = 10_000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SledStore::open(dir.path().join("store"))?);
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut append = task;
            while append < APPENDS {
                let stream = StreamId::new(format!("order-{}", append % STREAMS))?;
                let event = NewEvent::new("Placed", vec![7u8; 100]);
                store
                    .append(&stream, ExpectedVersion::Any, vec![event])
                    .await?;
                append += TASKS;
            }
            Ok::<_, Box<dyn Error + Send + Sync>>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let stats = store.stats();
    println!("appends: {}", stats.appends);
    println!("group_commits: {}", stats.group_commits);
    println!(
        "appends_per_group_commit: {:.1}",
        stats.appends as f64 / stats.group_commits as f64
    );
    store.shutdown().await?;
    Ok(())
}
