//! Measures projections on the sled store: the catch-up rate over 200,000
//! pre-written events (for a plain projection and for a sled read model
//! committed with its checkpoint), and the live delivery latency from an
//! append's acknowledgement to the handler seeing the event. The writer
//! answers the appender and publishes to the live feed back to back, so the
//! handler often sees an event before the appender's task even resumes
//! (`live_seen_before_ack`, counted as 0 µs); `read_your_writes_wait_for_*`
//! is what a caller waits from the ack until `wait_for` returns.
//!
//! `cargo run --release --example projection_rates`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use annals::projection::{ProjectionContext, ProjectionError, SledProjection};
use annals::store::{Durability, ReadModelBatch, SledStoreConfig};
use annals::{
    EventStore, ExpectedVersion, NewEvent, Position, Projection, ProjectionConfig,
    ProjectionHandle, RecordedEvent, SledStore, StreamId,
};

const CATCHUP_EVENTS: u64 = 200_000;
const LIVE_EVENTS: usize = 3_000;

/// Counts events per stream in memory.
struct Counter(HashMap<String, u64>);

impl Projection for Counter {
    async fn handle(
        &mut self,
        event: &RecordedEvent,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        *self.0.entry(event.stream_id.to_string()).or_default() += 1;
        Ok(())
    }
}

/// Counts events per stream in a sled tree.
struct SledCounter;

impl SledProjection for SledCounter {
    fn trees(&self) -> Vec<String> {
        vec!["rates-counts".into()]
    }

    fn handle(
        &mut self,
        event: &RecordedEvent,
        batch: &mut ReadModelBatch,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        batch.update::<u64>("rates-counts", event.stream_id.as_str(), |count| count + 1)?;
        Ok(())
    }
}

/// Notes when each position reached the handler.
struct Stamper(Arc<Mutex<Vec<(Position, Instant)>>>);

impl Projection for Stamper {
    async fn handle(
        &mut self,
        event: &RecordedEvent,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        self.0
            .lock()
            .unwrap()
            .push((event.position, Instant::now()));
        Ok(())
    }
}

async fn prewrite(store: Arc<SledStore>) -> Result<Position, Box<dyn std::error::Error>> {
    let mut tasks = Vec::new();
    for writer in 0..8u64 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut last = Position::START;
            for batch in 0..(CATCHUP_EVENTS / 8 / 100) {
                let stream = StreamId::new(format!("order-{}", (writer * 1000 + batch) % 5000))
                    .expect("valid stream id");
                let events = (0..100)
                    .map(|i| NewEvent::new("OrderLineAdded", vec![i as u8; 64]))
                    .collect();
                last = store
                    .append(&stream, ExpectedVersion::Any, events)
                    .await
                    .expect("append")
                    .last_position;
            }
            last
        }));
    }
    let mut head = Position::START;
    for task in tasks {
        // Not `head_position()`: the writer answers appends just before it
        // moves the head, so the head may still lag the last acknowledgement.
        head = head.max(task.await?);
    }
    Ok(head)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Catch-up: 200,000 events written first, then projections start at 0.
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SledStore::open_with(
        SledStoreConfig::new(dir.path()).durability(Durability::Flush),
    )?);
    let head = prewrite(Arc::clone(&store)).await?;
    assert_eq!(head, Position(CATCHUP_EVENTS));

    let started = Instant::now();
    let plain = ProjectionHandle::spawn(
        store.clone(),
        ProjectionConfig::builder("rates-plain").build()?,
        Counter(HashMap::new()),
    )
    .await?;
    plain.wait_for(head, Duration::from_secs(300)).await?;
    let plain_rate = CATCHUP_EVENTS as f64 / started.elapsed().as_secs_f64();
    plain.shutdown().await?;

    let started = Instant::now();
    let sled = ProjectionHandle::spawn_sled(
        Arc::clone(&store),
        ProjectionConfig::builder("rates-sled").build()?,
        SledCounter,
    )
    .await?;
    sled.wait_for(head, Duration::from_secs(300)).await?;
    let sled_rate = CATCHUP_EVENTS as f64 / started.elapsed().as_secs_f64();
    sled.shutdown().await?;
    store.shutdown().await?;
    drop(store);

    // Live: a steady stream of single-event appends with the default
    // durability (fdatasync before the acknowledgement), one every 500 µs.
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SledStore::open(dir.path())?);
    let stamps = Arc::new(Mutex::new(Vec::with_capacity(LIVE_EVENTS)));
    let live = ProjectionHandle::spawn(
        store.clone(),
        ProjectionConfig::builder("rates-live").build()?,
        Stamper(Arc::clone(&stamps)),
    )
    .await?;
    let stream = StreamId::new("order-live")?;
    let mut acks = Vec::with_capacity(LIVE_EVENTS);
    let mut ticker = tokio::time::interval(Duration::from_micros(500));
    for i in 0..LIVE_EVENTS {
        ticker.tick().await;
        let appended = store
            .append(
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::new("OrderLineAdded", vec![i as u8; 64])],
            )
            .await?;
        acks.push((appended.last_position, Instant::now()));
    }
    let last = acks.last().map_or(Position::START, |(p, _)| *p);
    live.wait_for(last, Duration::from_secs(30)).await?;

    // Read-your-writes as a caller sees it: from the ack until `wait_for`
    // returns, one append at a time.
    let mut waits = Vec::with_capacity(LIVE_EVENTS / 3);
    for i in 0..LIVE_EVENTS / 3 {
        let appended = store
            .append(
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::new("OrderLineAdded", vec![i as u8; 64])],
            )
            .await?;
        let acked = Instant::now();
        live.wait_for(appended.last_position, Duration::from_secs(5))
            .await?;
        waits.push(acked.elapsed());
    }
    waits.sort();
    live.shutdown().await?;
    let seen: HashMap<Position, Instant> = stamps.lock().unwrap().iter().copied().collect();
    let mut before_ack = 0;
    let mut latencies: Vec<Duration> = acks
        .iter()
        .map(|(position, acked)| {
            let seen = seen[position];
            if seen < *acked {
                // The writer publishes right after answering the appender,
                // so the handler can win the race to the CPU.
                before_ack += 1;
            }
            seen.saturating_duration_since(*acked)
        })
        .collect();
    latencies.sort();
    store.shutdown().await?;

    println!("catchup_events: {CATCHUP_EVENTS}");
    println!("catchup_events_per_s: {plain_rate:.0}");
    println!("catchup_sled_read_model_events_per_s: {sled_rate:.0}");
    println!("live_events: {LIVE_EVENTS}");
    println!(
        "live_latency_p50_us: {}",
        percentile(&latencies, 0.50).as_micros()
    );
    println!(
        "live_latency_p99_us: {}",
        percentile(&latencies, 0.99).as_micros()
    );
    println!(
        "live_latency_max_us: {}",
        latencies.last().copied().unwrap_or_default().as_micros()
    );
    println!("live_seen_before_ack: {before_ack}");
    println!(
        "read_your_writes_wait_for_p50_us: {}",
        percentile(&waits, 0.50).as_micros()
    );
    println!(
        "read_your_writes_wait_for_p99_us: {}",
        percentile(&waits, 0.99).as_micros()
    );
    Ok(())
}
