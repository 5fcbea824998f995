//! What an aggregate costs when it is live (its own actor) and when it is
//! idle (its warm state held by the runtime, no actor), and what a command
//! to an idle one costs. `cargo run --release --example idle_aggregates`.
//!
//! Prints `name: value` lines. Each figure is the median of `IDLE_RUNS`
//! runs (default 3), each run in a fresh child process of this program:
//! resident memory only grows inside one process (freed memory stays with
//! the allocator), so a second measurement there would read zero.
//!
//! - `rss_bytes_per_live_aggregate`: resident bytes per live aggregate,
//!   `LIVE_AGGREGATES` of them (default 100,000), each started by a state
//!   query and left live.
//! - `rss_bytes_per_idle_aggregate`: resident bytes per idle aggregate,
//!   `IDLE_AGGREGATES` of them (default 1,000,000), each with one event,
//!   warmed by a state query and passivated (at most 1,000 live at once,
//!   then none), beyond the store's own memory (measured before).
//! - `reactivate_us`: median latency of a command to a warm idle aggregate
//!   (its actor starts from the warm state), the whole command on the
//!   in-memory store, so no disk I/O: the runtime's own cost.
//! - `command_us_live`: the same command to a live aggregate.
//! - `command_us_cold`: the same command to an aggregate that was not kept
//!   warm (`max_idle_aggregates(0)`): its actor recovers from the store.
//! - `store_reads_per_idle_command`: store reads (stream versions,
//!   snapshots, stream reads) per command to a warm idle aggregate.
//!
//! The stores are in memory (`MemoryStore`, wrapped to count reads), so
//! that what is measured is the runtime, not the disk or sled's cache.

#[path = "common/mod.rs"]
mod common;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use annals::codec::encode_event;
use annals::store::{
    AppendError, AppendResult, EventFilter, LiveFeed, ReadDirection, ReadError, Snapshot,
};
use annals::{
    Aggregates, EventStore, ExpectedVersion, MemoryStore, NewEvent, Position, RecordedEvent,
    Runtime, RuntimeConfig, StoreError, StreamId, Version,
};
use async_trait::async_trait;
use common::{increment, Counter, CounterEvent};

type Result<T, E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

/// Set in a child process: which measurement it runs.
const CHILD: &str = "ANNALS_IDLE_CHILD";
/// Live actors at most while warming the idle aggregates.
const WARMING_LIVE: usize = 1_000;
/// Commands timed per latency figure.
const TIMED: usize = 20_000;

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(text) => Ok(text.replace('_', "").parse()?),
        Err(_) => Ok(default),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    match std::env::var(CHILD).as_deref() {
        Ok("live") => live_child(env_usize("LIVE_AGGREGATES", 100_000)?).await,
        Ok("idle") => idle_child(env_usize("IDLE_AGGREGATES", 1_000_000)?).await,
        Ok(other) => Err(format!("unknown child {other}").into()),
        Err(_) => parent(),
    }
}

/// Runs each child `IDLE_RUNS` times and prints the medians.
fn parent() -> Result<()> {
    let runs = env_usize("IDLE_RUNS", 3)?.max(1);
    println!("load_average_start: {}", common::load_average());
    let mut figures: Vec<(String, Vec<f64>)> = Vec::new();
    for run in 0..runs {
        for child in ["live", "idle"] {
            let output = Command::new(std::env::current_exe()?)
                .env(CHILD, child)
                .output()?;
            if !output.status.success() {
                return Err(format!(
                    "{child} run {run} failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                )
                .into());
            }
            for line in String::from_utf8(output.stdout)?.lines() {
                let Some((name, value)) = line.split_once(": ") else {
                    continue;
                };
                let Ok(value) = value.parse::<f64>() else {
                    continue;
                };
                println!("run_{run}_{name}: {value}");
                match figures.iter_mut().find(|(known, _)| known == name) {
                    Some((_, values)) => values.push(value),
                    None => figures.push((name.to_owned(), vec![value])),
                }
            }
        }
    }
    println!("runs: {runs}");
    for (name, mut values) in figures {
        values.sort_by(f64::total_cmp);
        println!("{name}: {}", values[values.len() / 2]);
    }
    println!("load_average_end: {}", common::load_average());
    Ok(())
}

/// Resident bytes per live aggregate: `count` actors started by a state
/// query, all kept live.
async fn live_child(count: usize) -> Result<()> {
    let config = RuntimeConfig::builder()
        .max_live_aggregates(count * 2)
        .idle_timeout(Duration::from_secs(3600))
        .build()?;
    let runtime = Runtime::new(Arc::new(MemoryStore::new()), config);
    let counters = runtime.aggregates::<Counter>();
    // The supervisor's and the first actor's one-off allocations first.
    counters.state("warm").await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = rss()?;
    states(&counters, 0..count).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss()?;
    if runtime.live_aggregates() != count + 1 {
        return Err(format!("{} live, not {}", runtime.live_aggregates(), count + 1).into());
    }
    println!("live_aggregates: {count}");
    println!(
        "rss_bytes_per_live_aggregate: {:.0}",
        after.saturating_sub(before) as f64 / count as f64
    );
    runtime.shutdown().await?;
    Ok(())
}

/// Resident bytes per idle aggregate, then the command latencies.
async fn idle_child(count: usize) -> Result<()> {
    let store = Arc::new(CountingStore::default());
    let started = Instant::now();
    append_one_each(&store, count).await?;
    let appended_s = started.elapsed().as_secs_f64();
    let config = RuntimeConfig::builder()
        .max_live_aggregates(WARMING_LIVE)
        .max_idle_aggregates(count + WARMING_LIVE)
        .idle_timeout(Duration::from_secs(1))
        .build()?;
    let runtime = Runtime::new(Arc::clone(&store), config.clone());
    let counters = runtime.aggregates::<Counter>();
    counters.state("warm").await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = rss()?;
    let started = Instant::now();
    states(&counters, 0..count).await?;
    let warmed_s = started.elapsed().as_secs_f64();
    // The idle sweep passivates the last live ones (1 s idle timeout).
    let deadline = Instant::now() + Duration::from_secs(30);
    while runtime.live_aggregates() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss()?;
    let idle = runtime.idle_aggregates();
    if idle < count || runtime.live_aggregates() != 0 {
        return Err(format!(
            "{idle} idle and {} live, not {count} and 0",
            runtime.live_aggregates()
        )
        .into());
    }
    println!("idle_aggregates: {idle}");
    println!("append_s: {appended_s:.1}");
    println!("warm_s: {warmed_s:.1}");
    println!(
        "rss_bytes_per_idle_aggregate: {:.0}",
        after.saturating_sub(before) as f64 / idle as f64
    );

    // Commands to warm idle aggregates, one at a time, spread over all.
    let step = (count / TIMED).max(1);
    let ids: Vec<usize> = (0..count).step_by(step).take(TIMED).collect();
    let reads_before = store.reads();
    let idle_latency = timed_commands(&counters, &ids).await?;
    let reads = store.reads() - reads_before;
    println!("reactivate_us: {:.1}", micros(idle_latency));
    println!(
        "store_reads_per_idle_command: {:.3}",
        reads as f64 / ids.len() as f64
    );
    // The same aggregates, live now (the last ones commanded).
    let live_ids: Vec<usize> = ids[ids.len() - WARMING_LIVE / 2..].to_vec();
    let live_latency = timed_commands(&counters, &live_ids).await?;
    println!("command_us_live: {:.1}", micros(live_latency));
    runtime.shutdown().await?;

    // No warm states: every command to a stopped aggregate recovers.
    let cold = Runtime::new(
        Arc::clone(&store),
        config.to_builder().max_idle_aggregates(0).build()?,
    );
    let cold_counters = cold.aggregates::<Counter>();
    let cold_ids: Vec<usize> = ids
        .iter()
        .map(|id| id + 1)
        .filter(|id| *id < count)
        .collect();
    let cold_latency = timed_commands(&cold_counters, &cold_ids).await?;
    println!("command_us_cold: {:.1}", micros(cold_latency));
    cold.shutdown().await?;
    Ok(())
}

/// One event on each of `count` streams, appended directly on the store.
async fn append_one_each(store: &Arc<CountingStore>, count: usize) -> Result<()> {
    let event = encode_event(&CounterEvent::Incremented { by: 1 })?;
    let tasks: Vec<_> = (0..16)
        .map(|task| {
            let store = Arc::clone(store);
            let event = event.clone();
            tokio::spawn(async move {
                for n in (task..count).step_by(16) {
                    let stream = StreamId::new(format!("counter-{n}"))?;
                    let mut event = event.clone();
                    event.event_id = uuid::Uuid::now_v7();
                    store
                        .append(&stream, ExpectedVersion::NoStream, vec![event])
                        .await?;
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// A state query for each id of `ids`, a thousand at a time.
async fn states(counters: &Aggregates<Counter>, ids: impl Iterator<Item = usize>) -> Result<()> {
    let ids: Vec<usize> = ids.collect();
    for chunk in ids.chunks(1000) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|n| {
                let counters = counters.clone();
                let id = n.to_string();
                tokio::spawn(async move { counters.state(&id).await })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
    }
    Ok(())
}

/// The median latency of one command to each of `ids`, one at a time.
async fn timed_commands(counters: &Aggregates<Counter>, ids: &[usize]) -> Result<Duration> {
    let mut latencies = Vec::with_capacity(ids.len());
    for id in ids {
        let id = id.to_string();
        let started = Instant::now();
        counters.execute(&id, increment()).await?;
        latencies.push(started.elapsed());
    }
    latencies.sort_unstable();
    Ok(common::percentile(&latencies, 0.5))
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

fn rss() -> Result<u64> {
    Ok(common::rss_bytes().ok_or("no /proc/self/status")?)
}

/// A [`MemoryStore`] that counts the reads an aggregate's recovery or
/// catch-up makes, and that a runtime's shutdown leaves open.
#[derive(Debug, Default)]
struct CountingStore {
    inner: MemoryStore,
    reads: AtomicU64,
}

impl CountingStore {
    fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    fn count(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl EventStore for CountingStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, AppendError> {
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: Version,
        direction: ReadDirection,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.count();
        self.inner.read_stream(stream, from, direction, limit).await
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Version, ReadError> {
        self.count();
        self.inner.stream_version(stream).await
    }

    async fn read_all(
        &self,
        from: Position,
        direction: ReadDirection,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.count();
        self.inner.read_all(from, direction, limit, filter).await
    }

    fn head_position(&self) -> Position {
        self.inner.head_position()
    }

    fn subscribe_live(&self) -> LiveFeed {
        self.inner.subscribe_live()
    }

    async fn save_snapshot(&self, stream: &StreamId, snapshot: Snapshot) -> Result<(), StoreError> {
        self.inner.save_snapshot(stream, snapshot).await
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, ReadError> {
        self.count();
        self.inner.load_snapshot(stream).await
    }

    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), StoreError> {
        self.inner.delete_snapshot(stream).await
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        self.inner.save_checkpoint(name, position).await
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, ReadError> {
        self.inner.load_checkpoint(name).await
    }

    /// Outlives the runtimes over it: the cold runtime reads what the
    /// warm one left.
    async fn shutdown(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
