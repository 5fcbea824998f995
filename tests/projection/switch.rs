//! The switch from catch-up to live under concurrent appends: a
//! subscription started while many tasks append sees every event exactly
//! once, in order, for the whole log and for a category, on both backends.

use std::sync::Arc;
use std::time::Duration;

use annals::projection::{subscribe, Subscription};
use annals::store::{Durability, EventFilter, ReadDirection, SledStoreConfig};
use annals::{
    EventStore, ExpectedVersion, MemoryStore, NewEvent, Position, RecordedEvent, SledStore,
    StreamId,
};
use futures::StreamExt;

const WRITERS: usize = 6;
const APPENDS_PER_WRITER: usize = 60;

fn sled_store(dir: &tempfile::TempDir) -> Arc<SledStore> {
    Arc::new(
        SledStore::open_with(SledStoreConfig::new(dir.path()).durability(Durability::Flush))
            .expect("open sled store"),
    )
}

/// Appends from `WRITERS` tasks at once; each append carries 1 to 3 events
/// on an `order-*` or `user-*` stream.
async fn append_concurrently(store: Arc<dyn EventStore>, round: usize) {
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for i in 0..APPENDS_PER_WRITER {
                let category = if (writer + i) % 3 == 0 {
                    "user"
                } else {
                    "order"
                };
                let stream = StreamId::new(format!("{category}-{round}-{writer}")).unwrap();
                let events = (0..1 + i % 3)
                    .map(|k| NewEvent::new("Happened", vec![k as u8]))
                    .collect();
                store
                    .append(&stream, ExpectedVersion::Any, events)
                    .await
                    .expect("append");
                if i % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

async fn expected(store: &dyn EventStore, from: Position, filter: &EventFilter) -> Vec<Position> {
    store
        .read_all(from.next(), ReadDirection::Forward, usize::MAX, filter)
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect()
}

/// Takes events until `count` arrived, then checks that nothing more comes.
async fn collect(subscription: &mut Subscription, count: usize) -> Vec<RecordedEvent> {
    let mut seen = Vec::with_capacity(count);
    while seen.len() < count {
        let event = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {} of {count} events", seen.len()))
            .expect("the subscription does not end")
            .expect("no read error");
        seen.push(event);
    }
    let extra = tokio::time::timeout(Duration::from_millis(50), subscription.next()).await;
    assert!(extra.is_err(), "an event beyond the log: {extra:?}");
    seen
}

/// Starts the subscription while the appends run, from `from`, and checks
/// it against a read of the finished log.
async fn check_switch(
    store: Arc<dyn EventStore>,
    round: usize,
    from: Position,
    filter: EventFilter,
    page_size: usize,
) {
    let writers = tokio::spawn(append_concurrently(Arc::clone(&store), round));
    // Let some appends land first, so that the subscription has both a
    // catch-up part and a live part.
    tokio::time::sleep(Duration::from_millis(2 + (round as u64 % 4) * 3)).await;
    let mut subscription =
        subscribe(Arc::clone(&store), from, filter.clone()).with_page_size(page_size);
    writers.await.unwrap();

    let expected = expected(&*store, from, &filter).await;
    assert!(!expected.is_empty());
    let seen = collect(&mut subscription, expected.len()).await;
    let positions: Vec<Position> = seen.iter().map(|e| e.position).collect();
    assert_eq!(positions, expected, "round {round}, filter {filter:?}");
    for event in &seen {
        assert!(filter.matches(event.stream_id.as_str(), &event.event_type));
    }
    // The wait for extra events let it pass the filtered-out tail too.
    assert_eq!(subscription.position(), store.head_position());
}

async fn all_filters(store: Arc<dyn EventStore>) {
    let mut round = 0;
    for filter in [EventFilter::All, EventFilter::Category("order".into())] {
        for page_size in [7, 512] {
            let from = store.head_position();
            check_switch(Arc::clone(&store), round, from, filter.clone(), page_size).await;
            round += 1;
        }
    }
    // From the very start of a log that already holds the earlier rounds.
    check_switch(
        Arc::clone(&store),
        round,
        Position::START,
        EventFilter::All,
        64,
    )
    .await;
    round += 1;
    check_switch(
        store,
        round,
        Position(3),
        EventFilter::Category("user".into()),
        5,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_switch_to_live_exactly_once_in_order() {
    all_filters(Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_store_switch_to_live_exactly_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    all_filters(sled_store(&dir)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_is_a_stream_and_next_is_cancel_safe() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let stream = StreamId::new("order-1").unwrap();
    let mut subscription = subscribe(Arc::clone(&store), Position::START, EventFilter::All);
    // A `next` cancelled while waiting for the live feed loses nothing.
    let cancelled = tokio::time::timeout(Duration::from_millis(20), subscription.next()).await;
    assert!(cancelled.is_err());
    for i in 0..5u8 {
        store
            .append(
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::new("Happened", vec![i])],
            )
            .await
            .unwrap();
    }
    let events: Vec<_> = subscription.by_ref().take(5).collect().await;
    let payloads: Vec<u8> = events.into_iter().map(|e| e.unwrap().payload[0]).collect();
    assert_eq!(payloads, vec![0, 1, 2, 3, 4]);
}
