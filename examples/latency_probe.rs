//! Open-loop latency below the throughput example's figure: appends straight
//! to the store, or commands through the runtime, sent on a fixed schedule
//! whatever the answers do, each timed from its due time. It separates what
//! the store costs from what the runtime adds.
//!
//! ```text
//! cargo run --release --example latency_probe -- store 5000     # appends/s
//! cargo run --release --example latency_probe -- runtime 5000   # commands/s
//! PREFILL=500000 SECS=6 cargo run --release --example latency_probe -- store 5000
//! INDEX_FLUSH=100000000 cargo run --release --example latency_probe -- runtime 39000
//! ```
//!
//! `INDEX_FLUSH` sets `SledStoreConfig::stream_index_flush_events` (a value
//! above what the run appends: no stream index flush during it).
//!
//! Both spread the load over 10,000 streams (warm aggregates, for the
//! runtime) on a fresh store, optionally holding `PREFILL` events first
//! (1,000 per append, on other streams); the first quarter of the `SECS` (default 6) is a
//! warm-up and not counted. Prints one line of figures.

#[path = "common/mod.rs"]
mod common;

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use annals::{EventStore, ExpectedVersion, NewEvent, Runtime, RuntimeConfig, SledStore, StreamId};
use tokio::sync::mpsc;

use common::{increment, percentile, Counter};

type Result<T, E = Box<dyn Error + Send + Sync>> = std::result::Result<T, E>;

const STREAMS: u64 = 10_000;
/// How often the sender sends what has come due.
const TICK: Duration = Duration::from_micros(200);

fn setting(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(value) => Ok(value.parse()?),
        Err(_) => Ok(default),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: latency_probe store|runtime RATE";
    let mode = args.next().ok_or(usage)?;
    let rate: f64 = args.next().ok_or(usage)?.parse()?;
    let secs = setting("SECS", 6)?;
    let prefill = setting("PREFILL", 0)?;
    if !rate.is_finite() || rate <= 0.0 || !matches!(mode.as_str(), "store" | "runtime") {
        return Err(usage.into());
    }

    let dir = tempfile::tempdir()?;
    let mut config = annals::store::SledStoreConfig::new(dir.path().join("store"));
    if let Ok(events) = std::env::var("INDEX_FLUSH") {
        config = config.stream_index_flush_events(events.parse()?);
    }
    let store = Arc::new(SledStore::open_with(config)?);
    let streams: Vec<StreamId> = (0..STREAMS)
        .map(|n| StreamId::new(format!("counter-{n}")))
        .collect::<Result<_, _>>()?;
    // On streams of their own: the counters would not decode these events.
    let mut filled = 0;
    while filled < prefill {
        let stream = &StreamId::new(format!("filled-{}", filled / 1000 % STREAMS))?;
        let batch = (0..1000)
            .map(|_| NewEvent::new("Filled", vec![1]))
            .collect();
        store.append(stream, ExpectedVersion::Any, batch).await?;
        filled += 1000;
    }
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let counters = runtime.aggregates::<Counter>();
    if mode == "runtime" {
        let warm: Vec<_> = (0..STREAMS)
            .map(|n| {
                let counters = counters.clone();
                tokio::spawn(async move { counters.execute(&n.to_string(), increment()).await })
            })
            .collect();
        for task in warm {
            task.await??;
        }
    }

    let before = store.stats();
    let total = (rate * secs as f64) as u64;
    let (sender, mut answers) = mpsc::unbounded_channel();
    let start = Instant::now();
    let mut issued = 0u64;
    while issued < total {
        let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
        while issued < due {
            let scheduled = start + Duration::from_secs_f64(issued as f64 / rate);
            let sender = sender.clone();
            let n = issued % STREAMS;
            let (store, stream, counters) =
                (store.clone(), streams[n as usize].clone(), counters.clone());
            let store_mode = mode == "store";
            tokio::spawn(async move {
                let done = if store_mode {
                    let event = NewEvent::new("Incremented", vec![1]);
                    store
                        .append(&stream, ExpectedVersion::Any, vec![event])
                        .await
                        .is_ok()
                } else {
                    counters.execute(&n.to_string(), increment()).await.is_ok()
                };
                let _ = sender.send(done.then(|| scheduled.elapsed()));
            });
            issued += 1;
        }
        // A plain sleep: tokio's timer would round 200 µs up to 1 ms.
        std::thread::sleep(TICK);
    }
    drop(sender);
    let mut latencies = Vec::with_capacity(total as usize);
    let mut failed = 0u64;
    while let Some(answer) = answers.recv().await {
        match answer {
            Some(latency) => latencies.push(latency),
            None => failed += 1,
        }
    }
    let elapsed = start.elapsed();
    let after = store.stats();
    // Answers arrive in about the order sent: drop the first quarter.
    let mut measured = latencies.split_off(latencies.len() / 4);
    measured.sort();
    if measured.is_empty() {
        return Err("nothing measured: raise SECS or RATE".into());
    }
    let us = |p: f64| percentile(&measured, p).as_micros();
    println!(
        "mode: {mode} offered_per_s: {rate:.0} achieved_per_s: {:.0} failed: {failed} \
         p50_us: {} p99_us: {} p999_us: {} appends_per_group_commit: {:.1} prefill: {prefill}",
        total as f64 / elapsed.as_secs_f64(),
        us(0.5),
        us(0.99),
        us(0.999),
        (after.appends - before.appends) as f64
            / (after.group_commits - before.group_commits).max(1) as f64,
    );
    runtime.shutdown().await?;
    Ok(())
}
