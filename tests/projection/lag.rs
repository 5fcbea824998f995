//! A slow or stuck consumer with a tiny live feed: it still sees every event
//! once, in order (it lags and re-reads from the store), appends never wait
//! for it, and it never slows another projection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use annals::projection::{subscribe, ProjectionContext, ProjectionError};
use annals::store::{Durability, EventFilter, SledStoreConfig, DEFAULT_MAX_EVENT_SIZE};
use annals::{
    EventStore, ExpectedVersion, MemoryStore, NewEvent, Position, Projection, ProjectionConfig,
    ProjectionHandle, RecordedEvent, SledStore, StreamId,
};
use tokio::sync::Notify;

const WRITERS: usize = 4;
const APPENDS_PER_WRITER: usize = 150;
const TOTAL: u64 = (WRITERS * APPENDS_PER_WRITER) as u64;

/// Appends `TOTAL` single-event appends from `WRITERS` tasks.
async fn append_all(store: Arc<dyn EventStore>) {
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new(format!("order-{writer}")).unwrap();
            for i in 0..APPENDS_PER_WRITER {
                store
                    .append(
                        &stream,
                        ExpectedVersion::Any,
                        vec![NewEvent::new("Happened", vec![i as u8])],
                    )
                    .await
                    .expect("append");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// A raw subscription consumer that sleeps on every event: appends all
/// finish while it is far behind, and it still gets every event in order.
async fn slow_subscriber(store: Arc<dyn EventStore>) {
    let seen = Arc::new(AtomicU64::new(0));
    let consumer = {
        let seen = Arc::clone(&seen);
        let mut subscription = subscribe(Arc::clone(&store), Position::START, EventFilter::All);
        tokio::spawn(async move {
            let mut expected = 1;
            while expected <= TOTAL {
                let event = subscription.next().await.unwrap().unwrap();
                assert_eq!(
                    event.position,
                    Position(expected),
                    "gap, duplicate or reordering"
                );
                expected += 1;
                seen.store(expected - 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            subscription
        })
    };
    append_all(Arc::clone(&store)).await;
    let seen_when_appends_done = seen.load(Ordering::SeqCst);
    assert!(
        seen_when_appends_done < TOTAL * 3 / 4,
        "the appends should not wait for the slow consumer (it had seen {seen_when_appends_done})"
    );
    let mut subscription = tokio::time::timeout(Duration::from_secs(20), consumer)
        .await
        .expect("the slow consumer catches up")
        .unwrap();
    let extra = tokio::time::timeout(Duration::from_millis(30), subscription.next()).await;
    assert!(extra.is_err(), "no event after the last one: {extra:?}");
}

/// A memory store whose live feed holds two commits.
fn tiny_feed_memory_store() -> Arc<dyn EventStore> {
    Arc::new(MemoryStore::with_limits(DEFAULT_MAX_EVENT_SIZE, 2).unwrap())
}

/// A sled store in `dir` whose live feed holds two commits.
fn tiny_feed_sled_store(dir: &tempfile::TempDir) -> Arc<dyn EventStore> {
    let config = SledStoreConfig::new(dir.path())
        .durability(Durability::Flush)
        .live_feed_capacity(2);
    Arc::new(SledStore::open_with(config).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_slow_subscriber_with_tiny_feed() {
    slow_subscriber(tiny_feed_memory_store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_store_slow_subscriber_with_tiny_feed() {
    let dir = tempfile::tempdir().unwrap();
    slow_subscriber(tiny_feed_sled_store(&dir)).await;
}

/// A subscriber with pages large enough to be read ahead, a tiny live feed
/// and appends going on while it is behind: it catches up page by page
/// with the next page read ahead, lags, and switches to live and back, and
/// still sees every event once, in order.
async fn lagging_subscriber_reading_ahead(store: Arc<dyn EventStore>) {
    use annals::projection::READ_AHEAD_MIN_PAGE;
    let page = READ_AHEAD_MIN_PAGE;
    let total = (7 * page / 2) as u64;
    let writers = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut written = 0;
            let mut append = 0;
            while written < total {
                let count = 37.min(total - written);
                let events = (0..count)
                    .map(|_| NewEvent::new("Happened", Vec::new()))
                    .collect();
                let stream = StreamId::new(format!("order-{}", append % 5)).unwrap();
                store
                    .append(&stream, ExpectedVersion::Any, events)
                    .await
                    .expect("append");
                written += count;
                append += 1;
                if append % 16 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    // Subscribed once two and a half pages are in: the catch-up reads its
    // second page ahead, with appends still going on.
    while store.head_position().0 < (5 * page / 2) as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut subscription =
        subscribe(Arc::clone(&store), Position::START, EventFilter::All).with_page_size(page);
    for expected in 1..=total {
        let event = tokio::time::timeout(Duration::from_secs(20), subscription.next())
            .await
            .expect("the subscriber stalled")
            .unwrap()
            .unwrap();
        assert_eq!(
            event.position,
            Position(expected),
            "gap, duplicate or reordering"
        );
        if expected % 512 == 0 {
            // Behind: the tiny feed drops commits, the next read catches up.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    writers.await.unwrap();
    let extra = tokio::time::timeout(Duration::from_millis(30), subscription.next()).await;
    assert!(extra.is_err(), "no event after the last one: {extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_lagging_subscriber_reading_ahead() {
    lagging_subscriber_reading_ahead(tiny_feed_memory_store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_store_lagging_subscriber_reading_ahead() {
    let dir = tempfile::tempdir().unwrap();
    lagging_subscriber_reading_ahead(tiny_feed_sled_store(&dir)).await;
}

/// Records positions; sleeps per event when slow; blocks on `gate` when stuck.
struct Recorder {
    seen: Arc<Mutex<Vec<Position>>>,
    delay: Duration,
    gate: Option<Arc<Notify>>,
}

impl Projection for Recorder {
    async fn handle(
        &mut self,
        event: &RecordedEvent,
        context: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        assert_eq!(event.position, context.position());
        if let Some(gate) = self.gate.take() {
            gate.notified().await;
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.seen.lock().unwrap().push(event.position);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_stuck_projections_never_hold_up_appends_or_each_other() {
    let store: Arc<dyn EventStore> =
        Arc::new(MemoryStore::with_limits(DEFAULT_MAX_EVENT_SIZE, 2).unwrap());
    let gate = Arc::new(Notify::new());
    let spawn = |name: &str, delay: Duration, gate: Option<Arc<Notify>>| {
        let store = Arc::clone(&store);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let projection = Recorder {
            seen: Arc::clone(&seen),
            delay,
            gate,
        };
        let config = ProjectionConfig::builder(name).batch_size(16);
        async move {
            let handle = ProjectionHandle::spawn(store, config.build().unwrap(), projection)
                .await
                .unwrap();
            (handle, seen)
        }
    };
    let (stuck, stuck_seen) = spawn("stuck", Duration::ZERO, Some(Arc::clone(&gate))).await;
    let (slow, slow_seen) = spawn("slow", Duration::from_millis(1), None).await;
    let (fast, fast_seen) = spawn("fast", Duration::ZERO, None).await;

    append_all(Arc::clone(&store)).await;
    let head = store.head_position();
    assert_eq!(head, Position(TOTAL));
    let slow_when_appends_done = slow.status().position;
    assert!(
        slow_when_appends_done.0 < TOTAL * 3 / 4,
        "appends should not wait for the slow projection (at {slow_when_appends_done})"
    );

    // The fast one is done long before the slow one, and the stuck one
    // holds up neither.
    fast.wait_for(head, Duration::from_secs(5)).await.unwrap();
    assert!(slow.status().position < head);
    let status = stuck.status();
    assert_eq!(status.position, Position::START);
    assert_eq!(status.lag, TOTAL);
    slow.wait_for(head, Duration::from_secs(20)).await.unwrap();

    // Released, the stuck one catches up from the store.
    gate.notify_one();
    stuck.wait_for(head, Duration::from_secs(5)).await.unwrap();

    let all: Vec<Position> = (1..=TOTAL).map(Position).collect();
    for seen in [&stuck_seen, &slow_seen, &fast_seen] {
        assert_eq!(*seen.lock().unwrap(), all);
    }
    for handle in [stuck, slow, fast] {
        assert_eq!(handle.shutdown().await.unwrap(), head);
        assert_eq!(
            store.load_checkpoint(handle.name()).await.unwrap(),
            Some(head)
        );
    }
}
