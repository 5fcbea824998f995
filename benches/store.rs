//! The sled store's hot paths: appending one event and batches of 10 and
//! 100 (with the default fdatasync, and buffered to show the cost without
//! the disk), reading one 100-event stream, and reading 1,000 events of
//! `$all`.
//!
//! `cargo bench --bench store`. Each figure samples for a few seconds only,
//! so that the whole suite takes a few minutes; CI only builds it.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

#[path = "../examples/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use annals::codec::encode_event;
use annals::store::{Durability, EventFilter, ReadDirection, SledStoreConfig};
use annals::{EventStore, ExpectedVersion, NewEvent, Position, SledStore, StreamId, Version};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use tokio::runtime::Runtime;

use common::CounterEvent;

fn events(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|_| encode_event(&CounterEvent::Incremented { by: 1 }).expect("encodes"))
        .collect()
}

fn open(durability: Durability) -> (tempfile::TempDir, Arc<SledStore>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        SledStore::open_with(SledStoreConfig::new(dir.path().join("store")).durability(durability))
            .expect("opens");
    (dir, Arc::new(store))
}

fn append(c: &mut Criterion) {
    let tokio = Runtime::new().expect("tokio");
    let mut group = c.benchmark_group("append");
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
        let stream = StreamId::new("bench-append").expect("valid");
        for size in [1usize, 10, 100] {
            group.throughput(Throughput::Elements(size as u64));
            group.bench_function(BenchmarkId::new(name, size), |b| {
                b.to_async(&tokio).iter_batched(
                    || events(size),
                    |batch| {
                        let store = Arc::clone(&store);
                        let stream = stream.clone();
                        async move {
                            store
                                .append(&stream, ExpectedVersion::Any, batch)
                                .await
                                .expect("appends")
                        }
                    },
                    BatchSize::SmallInput,
                );
            });
        }
        tokio.block_on(store.shutdown()).expect("shuts down");
    }
    group.finish();
}

fn read(c: &mut Criterion) {
    let tokio = Runtime::new().expect("tokio");
    let _guard = tokio.enter();
    let (_dir, store) = open(Durability::Buffered {
        flush_every_ms: 100,
    });
    let stream = StreamId::new("bench-read").expect("valid");
    tokio.block_on(async {
        store
            .append(&stream, ExpectedVersion::Any, events(100))
            .await
            .expect("appends");
        // Other streams interleaved, so that `$all` is not one stream.
        for n in 0..9 {
            let other = StreamId::new(format!("bench-other-{n}")).expect("valid");
            store
                .append(&other, ExpectedVersion::Any, events(100))
                .await
                .expect("appends");
        }
    });
    let mut group = c.benchmark_group("read");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    group.throughput(Throughput::Elements(100));
    group.bench_function("stream_100", |b| {
        b.to_async(&tokio).iter(|| async {
            let events = store
                .read_stream(&stream, Version::FIRST, ReadDirection::Forward, 100)
                .await
                .expect("reads");
            assert_eq!(events.len(), 100);
        });
    });
    group.throughput(Throughput::Elements(1000));
    group.bench_function("all_1000", |b| {
        b.to_async(&tokio).iter(|| async {
            let events = store
                .read_all(
                    Position::START,
                    ReadDirection::Forward,
                    1000,
                    &EventFilter::All,
                )
                .await
                .expect("reads");
            assert_eq!(events.len(), 1000);
        });
    });
    group.finish();
    tokio.block_on(store.shutdown()).expect("shuts down");
}

criterion_group!(benches, append, read);
criterion_main!(benches);
