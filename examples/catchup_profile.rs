//! Projection catch-up alone, for profiling: the catch-up figure of
//! `throughput` (a projection starting at 0 on a store of `N` events, with
//! the default `ProjectionConfig` on a `Durability::Fsync` store) next to a
//! plain sled scan of the same records, without the rest of that run.
//!
//! ```text
//! cargo run --release --example catchup_profile -- write DIR [N]   # N = 200000
//! cargo run --release --example catchup_profile -- catchup DIR [noop|counts] [checkpoint_every]
//! cargo run --release --example catchup_profile -- scan DIR
//! cargo run --release --example catchup_profile -- all DIR [rounds]
//! ```
//!
//! `catchup` and `scan` warm sled's cache with one untimed scan (as
//! `throughput` does), then call `measure_start` and `measure_end` around
//! the timed part, so that callgrind can count just that part:
//!
//! ```text
//! valgrind --tool=callgrind --zero-before='*measure_start*' \
//!     --dump-before='*measure_end*' target/release/examples/catchup_profile catchup DIR
//! ```
//!
//! `all` times `rounds` scans and catch-ups (no-op and counting handler)
//! alternately and prints the median rates and the events per second of
//! CPU time the whole process used (less disturbed by other load).

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::error::Error;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use annals::projection::{ProjectionContext, ProjectionError};
use annals::store::{Durability, SledStoreConfig};
use annals::{
    EventStore, Projection, ProjectionConfig, ProjectionHandle, RecordedEvent, SledStore,
};

type Result<T, E = Box<dyn Error + Send + Sync>> = std::result::Result<T, E>;

/// Does nothing: what is measured is the machinery.
struct Noop;

impl Projection for Noop {
    async fn handle(
        &mut self,
        _: &RecordedEvent,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        Ok(())
    }
}

/// Marks the start of the measured part for callgrind's `--zero-before`.
#[inline(never)]
pub fn measure_start() {
    // Different bodies, so that the linker does not fold the two markers.
    std::hint::black_box(1);
}

/// Marks the end of the measured part for callgrind's `--dump-before`.
#[inline(never)]
pub fn measure_end() {
    std::hint::black_box(2);
}

fn open(path: &Path) -> Result<Arc<SledStore>> {
    Ok(Arc::new(SledStore::open_with(
        SledStoreConfig::new(path).durability(Durability::Fsync),
    )?))
}

/// Plain sled on the shut-down store at `path`: the events scanned and how
/// long the scan took.
fn raw_scan(path: &Path) -> Result<(u64, Duration)> {
    Ok(common::scan_log(path)?)
}

/// A projection from 0 to the head; returns events/s and the fdatasyncs
/// the store made meanwhile.
async fn catch_up(
    store: &Arc<SledStore>,
    name: &str,
    noop: bool,
    checkpoint_every: Option<u64>,
) -> Result<(f64, u64)> {
    let head = store.head_position();
    let syncs = store.stats().durable_syncs;
    let start = Instant::now();
    let mut config = ProjectionConfig::builder(name);
    if let Some(events) = checkpoint_every {
        config = config.checkpoint_every(events, Duration::from_secs(3600));
    }
    let projection = if noop {
        ProjectionHandle::spawn(store.clone(), config.build()?, Noop).await?
    } else {
        ProjectionHandle::spawn(
            store.clone(),
            config.build()?,
            common::StreamCounts(HashMap::new()),
        )
        .await?
    };
    projection.wait_for(head, Duration::from_secs(600)).await?;
    let rate = head.0 as f64 / start.elapsed().as_secs_f64();
    let syncs = store.stats().durable_syncs - syncs;
    projection.shutdown().await?;
    Ok((rate, syncs))
}

/// User plus system CPU time of the whole process so far, in seconds (at
/// the kernel's tick resolution).
fn cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // The fields after the command name, which ends with the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').ok_or("bad /proc/self/stat")? + 2..]
        .split(' ')
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    match arg(0) {
        Some("write") => {
            let path = Path::new(arg(1).ok_or("write DIR [N]")?);
            let events = arg(2).map_or(Ok(200_000), str::parse)?;
            common::fill_bulk(path, events).await?;
            println!("wrote {events} events to {}", path.display());
        }
        Some("catchup") => {
            let path = Path::new(arg(1).ok_or("catchup DIR [noop|counts]")?);
            let noop = arg(2) != Some("counts");
            let checkpoint_every = arg(3).map(str::parse).transpose()?;
            // Untimed: the catch-up then finds the files in the page cache.
            raw_scan(path)?;
            let store = open(path)?;
            // A fresh name each run: the store keeps every checkpoint.
            let name = format!("profile-{}", std::process::id());
            measure_start();
            let (rate, syncs) = catch_up(&store, &name, noop, checkpoint_every).await?;
            measure_end();
            println!("catchup_events_per_s: {rate:.0}");
            println!("catchup_fdatasyncs: {syncs}");
            store.shutdown().await?;
        }
        Some("scan") => {
            let path = Path::new(arg(1).ok_or("scan DIR")?);
            raw_scan(path)?;
            measure_start();
            let (count, took) = raw_scan(path)?;
            let rate = count as f64 / took.as_secs_f64();
            measure_end();
            println!("raw_scan_events_per_s: {rate:.0}");
        }
        Some("all") => {
            let path = Path::new(arg(1).ok_or("all DIR [rounds]")?);
            let rounds: usize = arg(2).map_or(Ok(5), str::parse)?;
            let (events, _) = raw_scan(path)?;
            let mut figures = [(); 3].map(|()| (Vec::new(), 0.0));
            let mut syncs = 0;
            let pid = std::process::id();
            for round in 0..rounds {
                // The scan needs the store shut down (it lends no sled
                // handle); its wall time leaves the opening out, its CPU
                // time does not.
                let cpu_start = cpu_seconds()?;
                let (_, took) = raw_scan(path)?;
                figures[0].0.push(events as f64 / took.as_secs_f64());
                figures[0].1 += cpu_seconds()? - cpu_start;
                let store = open(path)?;
                for (kind, (rates, cpu)) in figures.iter_mut().enumerate().skip(1) {
                    let (start, cpu_start) = (Instant::now(), cpu_seconds()?);
                    let name = format!("all-{pid}-{round}-{kind}");
                    syncs = catch_up(&store, &name, kind == 1, None).await?.1;
                    rates.push(events as f64 / start.elapsed().as_secs_f64());
                    *cpu += cpu_seconds()? - cpu_start;
                }
                store.shutdown().await?;
            }
            println!("events: {events}, rounds: {rounds} (wall: median rate; cpu: all rounds)");
            let names = ["raw_scan", "catchup_noop", "catchup_counts"];
            let scan_wall = median(figures[0].0.clone());
            let scan_cpu = (events * rounds as u64) as f64 / figures[0].1;
            for (name, (rates, cpu)) in names.iter().zip(figures) {
                let wall = median(rates);
                let per_cpu = (events * rounds as u64) as f64 / cpu;
                println!(
                    "{name}: wall {wall:.0}/s (ratio {:.2}), cpu {per_cpu:.0}/cpu-s (ratio {:.2})",
                    wall / scan_wall,
                    per_cpu / scan_cpu
                );
            }
            println!("catchup_fdatasyncs (last run): {syncs}");
        }
        _ => {
            return Err(
                "usage: write DIR [N] | catchup DIR [noop|counts] [checkpoint_every] | scan DIR | all DIR [rounds]"
                    .into(),
            )
        }
    }
    Ok(())
}
