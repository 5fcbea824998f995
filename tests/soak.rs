//! A mixed run with memory sampled: commands on many aggregates through the
//! runtime (with constant passivation: a short idle timeout and few live
//! actors for many ids), reads of streams, of `$all` and of states, and a
//! projection following the log; then a phase of reads and recoveries only.
//!
//! sled 0.34 keeps per-page metadata in memory whatever its cache capacity,
//! so its resident memory grows with the data stored: about 150 bytes per
//! event, measured with raw sled alone (batches of the same keys, 8 MiB
//! cache: 20 MiB at 20,000 events, 43 MiB at 180,000). "Flat" therefore
//! means: after the warm-up, memory grows by at most 1.5 times the warm-up
//! sample plus 8 MiB plus 256 bytes per event appended since; and in the
//! read-only phase, with no data added, by at most 10% plus 4 MiB. A leak
//! per command, per actor spawned or per read fails one of them.
//!
//! `ANNALS_SOAK_SECS=N` runs for N seconds (default 10).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use annals::projection::{ProjectionContext, ProjectionError};
use annals::store::{Durability, EventFilter, ReadDirection, SledStoreConfig};
use annals::{
    Aggregate, DomainEvent, EventStore, Position, Projection, ProjectionConfig, ProjectionHandle,
    RecordedEvent, Runtime, RuntimeConfig, SledStore, StreamId, Version,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counter {
    total: u64,
    events: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum CounterEvent {
    Added { amount: u64, note: String },
}

impl DomainEvent for CounterEvent {}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Counter {
    type Command = u64;
    type Event = CounterEvent;
    type Error = Never;
    const CATEGORY: &'static str = "counter";

    fn handle(&self, amount: &u64) -> Result<Vec<CounterEvent>, Never> {
        Ok(vec![CounterEvent::Added {
            amount: *amount,
            note: "n".repeat((*amount % 64) as usize),
        }])
    }

    fn apply(&mut self, event: &CounterEvent) {
        let CounterEvent::Added { amount, .. } = event;
        self.total += amount;
        self.events += 1;
    }
}

/// A read model of constant size: a running sum and count.
struct Sum {
    events: Arc<AtomicU64>,
}

impl Projection for Sum {
    async fn handle(
        &mut self,
        _: &RecordedEvent,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        self.events.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

const AGGREGATES: u64 = 2_000;
const MAX_LIVE: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_under_a_mixed_load() {
    let secs: u64 = std::env::var("ANNALS_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let run_for = Duration::from_secs(secs.max(4));
    let warm_up = run_for / 4;
    let dir = tempfile::tempdir().unwrap();
    // A small sled cache, so that it fills during the warm-up; kill -9
    // durability (flush) is enough here and spares the shared disk. The
    // indexes are flushed every 4,096 events (32,768 by default), so that
    // the warm-up holds several flushes and a merge of id runs: the first
    // flush writes the index's first pages, a step of several MiB that is
    // not growth (at the default it fell after the warm-up sample, where
    // it ate most of the margin).
    let store = Arc::new(
        SledStore::open_with(
            SledStoreConfig::new(dir.path())
                .durability(Durability::Flush)
                .cache_capacity_bytes(8 << 20)
                .stream_index_flush_events(4096),
        )
        .unwrap(),
    );
    let runtime = Runtime::new(
        store.clone(),
        RuntimeConfig::builder()
            .snapshot_every(10)
            .idle_timeout(Duration::from_millis(50))
            .max_live_aggregates(MAX_LIVE)
            .build()
            .unwrap(),
    );
    let projected = Arc::new(AtomicU64::new(0));
    let projection = ProjectionHandle::spawn(
        store.clone(),
        ProjectionConfig::builder("soak-sum")
            .checkpoint_every(500, Duration::from_millis(200))
            .build()
            .unwrap(),
        Sum {
            events: Arc::clone(&projected),
        },
    )
    .await
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let writing = Arc::new(AtomicBool::new(true));
    let commands = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..4u64 {
        let (runtime, store, stop, writing, commands, reads) = (
            runtime.clone(),
            store.clone(),
            Arc::clone(&stop),
            Arc::clone(&writing),
            Arc::clone(&commands),
            Arc::clone(&reads),
        );
        workers.push(tokio::spawn(async move {
            let counters = runtime.aggregates::<Counter>();
            let mut rng = Rng(0x9E37_79B9 + worker);
            while !stop.load(Ordering::Relaxed) {
                let id = rng.below(AGGREGATES).to_string();
                let dice = if writing.load(Ordering::Relaxed) {
                    rng.below(10)
                } else {
                    rng.below(2)
                };
                match dice {
                    0 => {
                        counters.state(&id).await.expect("state");
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                    1 => {
                        let stream = StreamId::new(format!("counter-{id}")).unwrap();
                        store
                            .read_stream(&stream, Version::MAX, ReadDirection::Backward, 20)
                            .await
                            .expect("read stream");
                        store
                            .read_all(
                                Position::END,
                                ReadDirection::Backward,
                                50,
                                &EventFilter::All,
                            )
                            .await
                            .expect("read $all");
                        reads.fetch_add(2, Ordering::Relaxed);
                    }
                    _ => {
                        counters
                            .execute(&id, rng.below(1_000))
                            .await
                            .expect("command");
                        commands.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut warm_sample = None;
    let mut events_at_warm = 0;
    let mut read_phase_start = None;
    let mut events_at_read_phase = 0;
    let read_phase = run_for * 7 / 10;
    let mut max_live_seen = 0;
    let mut ticks = 0u64;
    while started.elapsed() < run_for {
        tokio::time::sleep(Duration::from_millis(250)).await;
        ticks += 1;
        max_live_seen = max_live_seen.max(runtime.live_aggregates());
        if ticks % 4 == 0 {
            samples.push((started.elapsed().as_secs(), rss_kib() / 1024));
        }
        if warm_sample.is_none() && started.elapsed() >= warm_up {
            warm_sample = Some(rss_kib());
            events_at_warm = store.head_position().0;
        }
        if read_phase_start.is_none() && started.elapsed() >= read_phase {
            writing.store(false, Ordering::Relaxed);
            // Let the projection and snapshots in flight settle first.
            tokio::time::sleep(Duration::from_millis(250)).await;
            read_phase_start = Some(rss_kib());
            events_at_read_phase = store.head_position().0;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let last = rss_kib();
    samples.push((started.elapsed().as_secs(), last / 1024));

    // The projection kept up: it reaches the head once the load stops.
    let head = store.head_position();
    projection
        .wait_for(head, Duration::from_secs(30))
        .await
        .expect("projection reaches the head");
    assert_eq!(projected.load(Ordering::Relaxed), head.0);
    projection.shutdown().await.unwrap();
    runtime.shutdown().await.unwrap();

    let warm = warm_sample.expect("a warm-up sample");
    let read_start = read_phase_start.expect("a read-only phase");
    let commands = commands.load(Ordering::Relaxed);
    let samples: Vec<String> = samples.iter().map(|(s, m)| format!("{s}s:{m}")).collect();
    println!(
        "soak secs={} commands={commands} reads={} events={} max_live_seen={max_live_seen} \
         rss_warm_mib={} rss_read_phase_mib={} rss_last_mib={} samples_mib=[{}]",
        run_for.as_secs(),
        reads.load(Ordering::Relaxed),
        head.0,
        warm / 1024,
        read_start / 1024,
        last / 1024,
        samples.join(" ")
    );
    assert!(
        commands > 0 && head.0 == commands,
        "every command stored one event"
    );
    // Passivation keeps the live actors near the maximum (the LRU sweep
    // runs on spawn; a few may be spawning at once).
    assert!(
        max_live_seen <= MAX_LIVE + 8,
        "{max_live_seen} live actors, maximum {MAX_LIVE}"
    );
    let stored_since_warm = events_at_read_phase - events_at_warm;
    assert!(
        read_start <= warm * 3 / 2 + 8 * 1024 + stored_since_warm * 256 / 1024,
        "memory grew after the warm-up: {} MiB, then {} MiB after {stored_since_warm} more events",
        warm / 1024,
        read_start / 1024
    );
    assert_eq!(
        head.0, events_at_read_phase,
        "the read-only phase wrote nothing"
    );
    assert!(
        last <= read_start * 11 / 10 + 4 * 1024,
        "memory grew with no data added: {} MiB, then {} MiB",
        read_start / 1024,
        last / 1024
    );
}
