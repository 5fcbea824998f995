//! Pieces shared by the measuring examples and the benches: a minimal
//! aggregate (one small event per command, so that what is measured is the
//! machinery, not the domain), percentiles, the machine's load, and
//! resident memory. Each user includes it with
//! `#[path = "..."] mod common;` and uses only part of it.

#![allow(dead_code)]

use std::collections::HashMap;
use std::error::Error;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use annals::codec::encode_event;
use annals::projection::{ProjectionContext, ProjectionError};
use annals::store::{Durability, SledStoreConfig};
use annals::{
    Aggregate, DomainEvent, EventStore, ExpectedVersion, NewEvent, Projection, RecordedEvent,
    SledStore, StreamId,
};
use serde::{Deserialize, Serialize};

/// A counter: the cheapest aggregate that still decides, applies and
/// snapshots like a real one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Counter {
    /// The sum of every increment.
    pub total: u64,
    /// How many increments were applied.
    pub count: u64,
}

/// What a [`Counter`] is asked to do.
#[derive(Debug, Clone)]
pub(crate) enum CounterCommand {
    /// Add `by` (refused when 0).
    Increment {
        /// The amount.
        by: u64,
    },
}

/// What happened to a [`Counter`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum CounterEvent {
    /// The counter went up by `by`.
    Incremented {
        /// The amount.
        by: u64,
    },
}

impl DomainEvent for CounterEvent {}

/// Why a [`Counter`] refuses a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CounterError {
    /// An increment of zero changes nothing and is a caller's mistake.
    #[error("an increment must be at least 1")]
    Zero,
}

impl Aggregate for Counter {
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Error = CounterError;
    const CATEGORY: &'static str = "counter";

    fn handle(&self, command: &CounterCommand) -> Result<Vec<CounterEvent>, CounterError> {
        match command {
            CounterCommand::Increment { by: 0 } => Err(CounterError::Zero),
            CounterCommand::Increment { by } => Ok(vec![CounterEvent::Incremented { by: *by }]),
        }
    }

    fn apply(&mut self, event: &CounterEvent) {
        match event {
            CounterEvent::Incremented { by } => {
                self.total += by;
                self.count += 1;
            }
        }
    }
}

/// The command every measurement sends.
pub(crate) fn increment() -> CounterCommand {
    CounterCommand::Increment { by: 1 }
}

/// The `p` quantile (0..=1) of `sorted`, nearest rank; zero when empty.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// The one-minute load average, as the kernel reports it ("unknown" off
/// Linux): other work on the machine skews every figure.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The process's resident set size in bytes (`VmRSS` of
/// `/proc/self/status`); `None` off Linux.
pub(crate) fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Counts events per stream, in memory: a projection that costs little,
/// so that a catch-up figure measures the machinery.
pub(crate) struct StreamCounts(pub HashMap<StreamId, u64>);

impl Projection for StreamCounts {
    async fn handle(
        &mut self,
        event: &RecordedEvent,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        *self.0.entry(event.stream_id.clone()).or_default() += 1;
        Ok(())
    }
}

/// Writes `events` counter events at `path` quickly (buffered, 1,000 per
/// append to streams `counter-bulk-{k % 1000}`, 4 writers, sled's cache at
/// the store's default): the store the catch-up, scan and open figures
/// read. Returns how much the process's resident memory grew per event
/// written, measured before the store is closed: what a long-lived writer
/// keeps for the log it wrote (`None` without `/proc`).
pub(crate) async fn fill_bulk(
    path: &Path,
    events: u64,
) -> Result<Option<f64>, Box<dyn Error + Send + Sync>> {
    let store = Arc::new(SledStore::open_with(
        SledStoreConfig::new(path).durability(Durability::Buffered {
            flush_every_ms: 1000,
        }),
    )?);
    let before = rss_bytes();
    let appends = events.div_ceil(1000);
    let writers = 4u64;
    let tasks: Vec<_> = (0..writers)
        .map(|writer| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut append = writer;
                while append < appends {
                    let n = (events - append * 1000).min(1000);
                    let stream = StreamId::new(format!("counter-bulk-{}", append % 1000))?;
                    let batch = (0..n)
                        .map(|_| encode_event(&CounterEvent::Incremented { by: 1 }))
                        .collect::<Result<Vec<NewEvent>, _>>()?;
                    store.append(&stream, ExpectedVersion::Any, batch).await?;
                    append += writers;
                }
                Ok::<(), Box<dyn Error + Send + Sync>>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let grown = match (before, rss_bytes()) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before) as f64 / events as f64),
        _ => None,
    };
    store.shutdown().await?;
    Ok(grown)
}

/// Plain sled, the floor under a catch-up: opens the shut-down store at
/// `path` with sled itself (the store's cache size and mode), then touches
/// the key and value of every chunk of the log (docs/design.md, "Tree `log`").
/// Returns how many events the chunks hold (each chunk's count, its first
/// four bytes), and how long the scan took (the opening not counted). sled
/// lets go of the directory a few milliseconds after this returns, which
/// `SledStore::open` waits for.
pub(crate) fn scan_log(path: &Path) -> Result<(u64, Duration), sled::Error> {
    let db = sled::Config::new()
        .path(path)
        .cache_capacity(SledStoreConfig::new(path).cache_capacity_bytes)
        .mode(sled::Mode::HighThroughput)
        .open()?;
    let log = db.open_tree("log")?;
    let start = std::time::Instant::now();
    let (mut count, mut bytes) = (0u64, 0usize);
    for entry in log.scan_prefix([b'C']) {
        let (key, value) = entry?;
        bytes += key.len() + value.len();
        let events: [u8; 4] = value
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .unwrap_or_default();
        count += u64::from(u32::from_be_bytes(events));
    }
    let took = start.elapsed();
    std::hint::black_box(bytes);
    Ok((count, took))
}
