//! The runtime's hot paths: recovering an aggregate of 10,000 events with
//! and without a snapshot (`Aggregates::state_at`, which rebuilds from the
//! store as a fresh actor does), and a command's round trip through a live
//! actor (with the default fdatasync, and buffered to show the cost of the
//! actor machinery alone).
//!
//! `cargo bench --bench runtime`. Short samples; CI only builds it.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

#[path = "../examples/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use annals::{
    encode_event, encode_value, Durability, EventStore, ExpectedVersion, NewEvent, Runtime,
    RuntimeConfig, SledStore, SledStoreConfig, Snapshot, StreamId, Version,
};
use criterion::{criterion_group, criterion_main, Criterion};

use common::{increment, Counter, CounterEvent};

const LOAD_EVENTS: u64 = 10_000;

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

fn load(c: &mut Criterion) {
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    let _guard = tokio.enter();
    let (_dir, store) = open(Durability::Buffered {
        flush_every_ms: 100,
    });
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default().snapshot_every(0));
    let counters = runtime.aggregates::<Counter>();
    tokio.block_on(async {
        for id in ["plain", "snapshotted"] {
            let stream = StreamId::new(format!("counter-{id}")).expect("valid");
            write_stream(&store, &stream, LOAD_EVENTS).await;
        }
        let state = counters
            .state_at("snapshotted", Version(LOAD_EVENTS))
            .await
            .expect("loads");
        let snapshot = Snapshot {
            version: Version(LOAD_EVENTS),
            payload: encode_value(&state).expect("encodes"),
        };
        let stream = StreamId::new("counter-snapshotted").expect("valid");
        store.save_snapshot(&stream, snapshot).await.expect("saves");
    });
    let mut group = c.benchmark_group("load_10000_events");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_millis(500));
    for (name, id) in [("no_snapshot", "plain"), ("with_snapshot", "snapshotted")] {
        group.bench_function(name, |b| {
            b.to_async(&tokio).iter(|| async {
                let state = counters
                    .state_at(id, Version(LOAD_EVENTS))
                    .await
                    .expect("loads");
                assert_eq!(state.count, LOAD_EVENTS);
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

criterion_group!(benches, load, command);
criterion_main!(benches);
