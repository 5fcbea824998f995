//! Concurrency: many tasks appending at once, on one stream and on many,
//! against every backend. Versions must stay 1..n with no gap or duplicate
//! (I2), `$all` must hold positions 1..N with no gap (I3), and every
//! acknowledged event must be where its acknowledgement says.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use annals::store::{AppendError, AppendResult, ReadDirection};
use annals::{
    EventStore, ExpectedVersion, MemoryStore, NewEvent, Position, RecordedEvent, SledStore,
    StreamId, Version,
};
use common::whole_log;
use tempfile::TempDir;
use tokio::sync::Barrier;
use uuid::Uuid;

/// A store under test and whatever must outlive it (its directory).
struct Backend {
    store: Arc<dyn EventStore>,
    _dir: Option<TempDir>,
}

fn memory() -> Backend {
    Backend {
        store: Arc::new(MemoryStore::new()),
        _dir: None,
    }
}

fn sled() -> Backend {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path().join("store")).expect("open sled store");
    Backend {
        store: Arc::new(store),
        _dir: Some(dir),
    }
}

macro_rules! for_each_backend {
    ($($case:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::memory()).await;
                }
            )*
        }
        mod sled_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::sled()).await;
                }
            )*
        }
    };
}

for_each_backend!(
    racing_exact_appends_to_one_stream,
    many_tasks_on_many_streams,
);

fn stream(id: &str) -> StreamId {
    StreamId::new(id).expect("valid stream id")
}

/// Fails the test instead of hanging it when a backend deadlocks.
async fn bounded<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 30 s"))
}

/// 64 tasks race each round with `Exact(current)` on one stream. Each task
/// appends 1 to 3 events, so a winner moves the stream by more than one.
/// Exactly one wins every round; the others see the winner's version.
async fn racing_exact_appends_to_one_stream(backend: Backend) {
    const TASKS: usize = 64;
    const ROUNDS: usize = 12;
    let store = Arc::clone(&backend.store);
    let id = stream("contended-1");
    let mut current = Version::NONE;
    let mut winners: Vec<Vec<Uuid>> = Vec::new();

    for round in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(TASKS));
        let mut tasks = Vec::with_capacity(TASKS);
        for task in 0..TASKS {
            let store = Arc::clone(&store);
            let id = id.clone();
            let barrier = Arc::clone(&barrier);
            let events: Vec<NewEvent> = (0..task % 3 + 1)
                .map(|i| NewEvent::new("Raced", format!("{round}/{task}/{i}").into_bytes()))
                .collect();
            tasks.push(tokio::spawn(async move {
                let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
                barrier.wait().await;
                let result = store
                    .append(&id, ExpectedVersion::Exact(current), events)
                    .await;
                (ids, result)
            }));
        }
        let mut won: Vec<(Vec<Uuid>, AppendResult)> = Vec::new();
        let mut loser_saw = Vec::new();
        for task in tasks {
            let (ids, result) = bounded("a racing append", task)
                .await
                .expect("task panicked");
            match result {
                Ok(appended) => won.push((ids, appended)),
                Err(AppendError::WrongExpectedVersion {
                    stream,
                    expected,
                    actual,
                }) => {
                    assert_eq!(stream, id);
                    assert_eq!(expected, ExpectedVersion::Exact(current));
                    // Checked below, once the winner's version is known.
                    loser_saw.push(actual);
                }
                Err(other) => panic!("round {round}: unexpected error {other}"),
            }
        }
        assert_eq!(won.len(), 1, "round {round}: {} winners", won.len());
        let (ids, appended) = won.pop().unwrap();
        assert_eq!(loser_saw, vec![appended.last_version; TASKS - 1]);
        assert_eq!(appended.first_version, current.next());
        assert_eq!(
            appended.last_version.0 - appended.first_version.0 + 1,
            ids.len() as u64
        );
        current = appended.last_version;
        winners.push(ids);
        assert_eq!(store.stream_version(&id).await.unwrap(), current);
    }

    // The stream is exactly the winners' events, in round order, 1..n.
    let stored = store
        .read_stream(&id, Version::FIRST, ReadDirection::Forward, usize::MAX)
        .await
        .unwrap();
    let expected_ids: Vec<Uuid> = winners.into_iter().flatten().collect();
    assert_eq!(
        stored.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        expected_ids
    );
    assert_eq!(
        stored.iter().map(|e| e.version.0).collect::<Vec<_>>(),
        (1..=current.0).collect::<Vec<_>>()
    );
    let log = whole_log(&*store).await;
    assert_eq!(log, stored, "losers wrote something to $all");
    assert_eq!(store.head_position(), Position(current.0));
}

/// What one task got acknowledged.
struct Acknowledged {
    stream: StreamId,
    ids: Vec<Uuid>,
    result: AppendResult,
}

/// 128 tasks, 16 streams, 12 appends each of 1 to 3 events. Half the tasks
/// append with `Any`; the other half read the version and append with
/// `Exact`, retrying on conflict, as an aggregate would. A subscriber taken
/// before the first append must see every commit.
async fn many_tasks_on_many_streams(backend: Backend) {
    const TASKS: usize = 128;
    const STREAMS: usize = 16;
    const APPENDS: usize = 12;
    let store = Arc::clone(&backend.store);
    let mut feed = store.subscribe_live();
    let barrier = Arc::new(Barrier::new(TASKS));

    let mut tasks = Vec::with_capacity(TASKS);
    for task in 0..TASKS {
        let store = Arc::clone(&store);
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut acknowledged = Vec::with_capacity(APPENDS);
            let mut conflicts = 0usize;
            for append in 0..APPENDS {
                let id = stream(&format!("cat{}-{}", task % 4, (task + append) % STREAMS));
                let events: Vec<NewEvent> = (0..(task + append) % 3 + 1)
                    .map(|i| NewEvent::new("Moved", format!("{task}/{append}/{i}").into_bytes()))
                    .collect();
                let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
                let result = if task % 2 == 0 {
                    store.append(&id, ExpectedVersion::Any, events).await
                } else {
                    loop {
                        let version = store.stream_version(&id).await.unwrap();
                        match store
                            .append(&id, ExpectedVersion::Exact(version), events.clone())
                            .await
                        {
                            Err(AppendError::WrongExpectedVersion { actual, .. }) => {
                                assert!(actual > version, "the stream went back to {actual}");
                                conflicts += 1;
                            }
                            other => break other,
                        }
                    }
                };
                let result = result.unwrap_or_else(|e| panic!("task {task}: {e}"));
                acknowledged.push(Acknowledged {
                    stream: id,
                    ids,
                    result,
                });
            }
            (acknowledged, conflicts)
        }));
    }

    let mut acknowledged = Vec::new();
    for task in tasks {
        let (acks, _conflicts) = bounded("an appending task", task)
            .await
            .expect("task panicked");
        acknowledged.extend(acks);
    }
    let total: u64 = acknowledged.iter().map(|a| a.ids.len() as u64).sum();

    // $all: positions 1..N, no gap, nothing more than was acknowledged.
    let log = whole_log(&*store).await;
    assert_eq!(
        log.iter().map(|e| e.position.0).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    assert_eq!(store.head_position(), Position(total));

    // Every acknowledged event is where its acknowledgement says, with its
    // versions and positions contiguous.
    for ack in &acknowledged {
        let r = ack.result;
        let count = ack.ids.len() as u64;
        assert_eq!(r.last_version.0 - r.first_version.0 + 1, count);
        assert_eq!(r.last_position.0 - r.first_position.0 + 1, count);
        for (offset, id) in ack.ids.iter().enumerate() {
            let event = &log[(r.first_position.0 - 1) as usize + offset];
            assert_eq!(event.event_id, *id);
            assert_eq!(event.stream_id, ack.stream);
            assert_eq!(event.version.0, r.first_version.0 + offset as u64);
        }
    }

    // Every stream's versions are 1..n in position order, and its reads
    // agree with $all.
    let mut by_stream: BTreeMap<StreamId, Vec<&RecordedEvent>> = BTreeMap::new();
    for event in &log {
        by_stream
            .entry(event.stream_id.clone())
            .or_default()
            .push(event);
    }
    assert_eq!(by_stream.len(), STREAMS * 4);
    for (id, events) in &by_stream {
        let n = events.len() as u64;
        assert_eq!(
            events.iter().map(|e| e.version.0).collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>(),
            "{id}"
        );
        assert_eq!(store.stream_version(id).await.unwrap(), Version(n));
        let read = store
            .read_stream(id, Version::FIRST, ReadDirection::Forward, usize::MAX)
            .await
            .unwrap();
        assert_eq!(read.iter().collect::<Vec<_>>(), *events, "{id}");
    }
    let unique: HashMap<Uuid, u64> = log.iter().map(|e| (e.event_id, e.position.0)).collect();
    assert_eq!(unique.len() as u64, total, "an event id is stored twice");

    // The live feed saw every event exactly once, in position order.
    let mut delivered = Vec::with_capacity(log.len());
    while (delivered.len() as u64) < total {
        let commit = bounded("the live feed", feed.recv())
            .await
            .expect("the feed lagged or closed");
        delivered.extend(commit.iter().cloned());
    }
    assert_eq!(delivered, log);
}
