//! The runtime's hot paths: recovering an evicted aggregate (a fresh actor
//! spawned and rebuilt by its `pre_start`) from a stream of 10,000 events
//! without a snapshot, and from streams of 1,000 to 100,000 events with a
//! snapshot near the head; and a command's round trip through a live actor
//! (with the default fdatasync, and buffered to show the cost of the actor
//! machinery alone).
//!
//! `cargo bench --bench runtime`. Short samples; CI only builds it.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

#[path = "../examples/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use annals::codec::{encode_event, encode_value};
use annals::store::{Durability, SledStoreConfig, Snapshot};
use annals::{
    EventStore, ExpectedVersion, NewEvent, Runtime, RuntimeConfig, SledStore, StreamId, Version,
};
use criterion::{criterion_group, criterion_main, Criterion};

use common::{increment, Counter, CounterEvent};

fn open(durability: Durability) -> (tempfile::TempDir, Arc<SledStore>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        SledStore::open_with(SledStoreConfig::new(dir.path().join("store")).durability(durability))
            .expect("opens");
    (dir, Arc::new(store))
}

async fn write_stream(store: &SledStore, stream: &StreamId, events: u64) {
    for _ in 0..events / 1000 {
        let batch: Vec<NewEvent> = (0..1000)
            .map(|_| encode_event(&CounterEvent::Incremented { by: 1 }).expect("encodes"))
            .collect();
        store
            .append(stream, ExpectedVersion::Any, batch)
            .await
            .expect("appends");
    }
}

/// Two streams of each length and kind, so that a bench can alternate
/// between them: recovering one evicts the other.
const RECOVERIES: [(&str, u64, bool); 4] = [
    ("10000_events_no_snapshot", 10_000, false),
    ("1000_events_with_snapshot", 1_000, true),
    ("10000_events_with_snapshot", 10_000, true),
    ("100000_events_with_snapshot", 100_000, true),
];

/// How far behind the head the snapshot is: fewer events than the default
/// `snapshot_every` (100), as the runtime leaves it.
const SNAPSHOT_TAIL: u64 = 50;

fn recover(c: &mut Criterion) {
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    let _guard = tokio.enter();
    let (_dir, store) = open(Durability::Buffered {
        flush_every_ms: 100,
    });
    // At most one live actor: each recovery evicts the other stream's
    // actor, so that every `state` call below spawns a fresh actor and runs
    // its recovery (`pre_start`: snapshot, then the events after it).
    // Snapshots off, so that a recovery never leaves a new one behind.
    let config = RuntimeConfig::builder()
        .snapshot_every(0)
        .max_live_aggregates(1)
        .build()
        .unwrap();
    let runtime = Runtime::new(store.clone(), config);
    let counters = runtime.aggregates::<Counter>();
    tokio.block_on(async {
        for (name, events, snapshot) in RECOVERIES {
            for side in ["a", "b"] {
                let id = format!("{name}-{side}");
                let stream = StreamId::new(format!("counter-{id}")).expect("valid");
                write_stream(&store, &stream, events).await;
                if snapshot {
                    let version = Version(events - SNAPSHOT_TAIL);
                    let state = counters.state_at(&id, version).await.expect("loads");
                    let payload = encode_value(&state).expect("encodes");
                    let snapshot = Snapshot { version, payload };
                    store.save_snapshot(&stream, snapshot).await.expect("saves");
                }
            }
        }
    });
    let mut group = c.benchmark_group("recover");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for (name, events, _) in RECOVERIES {
        let ids = [format!("{name}-a"), format!("{name}-b")];
        let mut next = 0;
        group.bench_function(name, |b| {
            b.to_async(&tokio).iter(|| {
                next = 1 - next;
                let id = &ids[next];
                let counters = &counters;
                async move {
                    let state = counters.state(id).await.expect("recovers");
                    assert_eq!(state.count, events);
                }
            });
        });
    }
    group.finish();
    tokio.block_on(runtime.shutdown()).expect("shuts down");
}

fn command(c: &mut Criterion) {
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    let mut group = c.benchmark_group("command_round_trip");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    let modes = [
        ("fsync", Durability::Fsync),
        (
            "buffered",
            Durability::Buffered {
                flush_every_ms: 100,
            },
        ),
    ];
    for (name, durability) in modes {
        let _guard = tokio.enter();
        let (_dir, store) = open(durability);
        let runtime = Runtime::new(store, RuntimeConfig::default());
        let counters = runtime.aggregates::<Counter>();
        // The actor is live before measuring: this is the round trip, not
        // the spawn.
        tokio
            .block_on(counters.execute("bench", increment()))
            .expect("executes");
        group.bench_function(name, |b| {
            b.to_async(&tokio).iter(|| async {
                counters
                    .execute("bench", increment())
                    .await
                    .expect("executes")
            });
        });
        tokio.block_on(runtime.shutdown()).expect("shuts down");
    }
    group.finish();
}

criterion_group!(benches, recover, command);
criterion_main!(benches);
