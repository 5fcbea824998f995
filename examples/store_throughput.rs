//! Append throughput of the sled store, for each durability mode: one task
//! appending single events one after another, and many tasks appending
//! single events to their own streams at once, sharing group commits.
//!
//! ```text
//! cargo run --release --example store_throughput
//! ```
//!
//! Prints one `name: value` line per figure, then a short summary with the
//! cost of the power-loss fix (the fdatasync of `Durability::Fsync` over
//! sled's own `Durability::Flush`). Each figure runs on a fresh store in a
//! temporary directory, on whatever disk holds the system's temp dir, and is
//! bounded in time so that the whole run stays under a minute.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use annals::store::{Durability, SledStoreConfig, StoreStats};
use annals::{EventStore, ExpectedVersion, NewEvent, SledStore, StreamId};
use tokio::sync::Barrier;

/// Payload of every appended event: a small domain event.
const PAYLOAD_BYTES: usize = 100;
/// Concurrent appenders, each with its own stream.
const TASK_COUNTS: [usize; 3] = [64, 256, 1024];
/// How long each concurrent figure runs.
const CONCURRENT_RUN: Duration = Duration::from_millis(1500);
/// The longest any sequential figure runs, whatever its count.
const SEQUENTIAL_BUDGET: Duration = Duration::from_secs(4);

struct Mode {
    name: &'static str,
    durability: Durability,
    /// Sequential appends to measure; fewer when each waits for the disk.
    sequential_count: u64,
}

/// What one figure measured.
struct Measured {
    events: u64,
    elapsed: Duration,
    /// The writer's counters at the end of the run.
    stats: StoreStats,
}

impl Measured {
    fn per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

fn open(durability: Durability) -> Result<(tempfile::TempDir, SledStore), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open_with(
        SledStoreConfig::new(dir.path().join("store")).durability(durability),
    )?;
    Ok((dir, store))
}

fn event() -> NewEvent {
    NewEvent::new("Measured", vec![0x42; PAYLOAD_BYTES])
}

/// One task, one stream, one event per append, each awaited before the next.
async fn sequential(mode: &Mode) -> Result<Measured, Box<dyn Error>> {
    let (_dir, store) = open(mode.durability)?;
    let stream = StreamId::new("sequential-1")?;
    let start = Instant::now();
    let mut events = 0;
    while events < mode.sequential_count && start.elapsed() < SEQUENTIAL_BUDGET {
        store
            .append(&stream, ExpectedVersion::Any, vec![event()])
            .await?;
        events += 1;
    }
    let elapsed = start.elapsed();
    let stats = store.stats();
    store.shutdown().await?;
    Ok(Measured {
        events,
        elapsed,
        stats,
    })
}

/// `tasks` tasks, each appending single events to its own stream until the
/// run ends; their appends share the writer's group commits.
async fn concurrent(mode: &Mode, tasks: usize) -> Result<Measured, Box<dyn Error>> {
    let (_dir, store) = open(mode.durability)?;
    let store = Arc::new(store);
    let barrier = Arc::new(Barrier::new(tasks + 1));
    let mut handles = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let store = Arc::clone(&store);
        let barrier = Arc::clone(&barrier);
        let stream = StreamId::new(format!("concurrent-{task}"))?;
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            let deadline = Instant::now() + CONCURRENT_RUN;
            let mut events = 0u64;
            while Instant::now() < deadline {
                store
                    .append(&stream, ExpectedVersion::Any, vec![event()])
                    .await?;
                events += 1;
            }
            Ok::<u64, annals::store::AppendError>(events)
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut events = 0;
    for handle in handles {
        events += handle.await??;
    }
    let elapsed = start.elapsed();
    let stats = store.stats();
    store.shutdown().await?;
    Ok(Measured {
        events,
        elapsed,
        stats,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let modes = [
        Mode {
            name: "fsync",
            durability: Durability::Fsync,
            sequential_count: 2_000,
        },
        Mode {
            name: "flush",
            durability: Durability::Flush,
            sequential_count: 2_000,
        },
        Mode {
            name: "buffered",
            durability: Durability::Buffered {
                flush_every_ms: 100,
            },
            sequential_count: 20_000,
        },
    ];
    // Other work on the machine skews every figure; say how busy it was.
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("unknown");
    println!("cpus: {cpus}");
    println!("load_average_1min_at_start: {load}");
    let run = Instant::now();
    // rates[mode][0] is sequential, then one per task count.
    let mut rates: Vec<Vec<f64>> = Vec::new();
    for mode in &modes {
        let mut figures = Vec::new();
        let single = sequential(mode).await?;
        println!(
            "{}_single_events_per_s: {:.0}",
            mode.name,
            single.per_second()
        );
        println!("{}_single_events_measured: {}", mode.name, single.events);
        figures.push(single.per_second());
        for tasks in TASK_COUNTS {
            let measured = concurrent(mode, tasks).await?;
            println!(
                "{}_concurrent_{tasks}_tasks_events_per_s: {:.0}",
                mode.name,
                measured.per_second()
            );
            println!(
                "{}_concurrent_{tasks}_tasks_appends_per_group_commit: {:.1}",
                mode.name,
                measured.stats.appends as f64 / measured.stats.group_commits.max(1) as f64
            );
            figures.push(measured.per_second());
        }
        rates.push(figures);
    }
    println!("total_run_s: {:.1}", run.elapsed().as_secs_f64());

    let (fsync, flush, buffered) = (&rates[0], &rates[1], &rates[2]);
    println!();
    println!("Summary ({PAYLOAD_BYTES}-byte single-event appends, one fresh store per figure):");
    println!(
        "- One appender waits for its own commit: {:.0} events/s with fsync (the default), \
         {:.0} with sled's flush only, {:.0} buffered.",
        fsync[0], flush[0], buffered[0]
    );
    for (i, tasks) in TASK_COUNTS.iter().enumerate() {
        println!(
            "- {tasks} concurrent appenders share group commits: {:.0} events/s fsync, \
             {:.0} flush, {:.0} buffered ({:.0}x the single appender with fsync).",
            fsync[i + 1],
            flush[i + 1],
            buffered[i + 1],
            fsync[i + 1] / fsync[0]
        );
    }
    let costs: Vec<String> = std::iter::once(("single".to_owned(), 0))
        .chain(
            TASK_COUNTS
                .iter()
                .enumerate()
                .map(|(i, t)| (format!("{t} tasks"), i + 1)),
        )
        .map(|(label, i)| format!("{label}: {:.2}x", flush[i] / fsync[i]))
        .collect();
    println!(
        "- Cost of the power-loss fix (fdatasync per group commit), flush/fsync throughput: {}.",
        costs.join(", ")
    );
    Ok(())
}
