//! Plain and typed projections receive a batch of events per call
//! (`handle_batch`), in catch-up and live alike; a batch that fails part
//! way counts the events before the failing one as handled, and the
//! failure policy sees the failing event itself; the default goes through
//! `handle` one event at a time, panics included.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use annals::codec::encode_event;
use annals::projection::{
    BatchFailure, FailurePolicy, ProjectionContext, ProjectionControlError, ProjectionError,
    ProjectionState, Typed,
};
use annals::store::EventFilter;
use annals::{
    DomainEvent, EventStore, ExpectedVersion, MemoryStore, NewEvent, Position, Projection,
    ProjectionConfig, ProjectionHandle, RecordedEvent, StreamId, TypedProjection,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum CountEvent {
    Counted(u64),
}

impl DomainEvent for CountEvent {}

/// What a projection saw: the positions of each call, one `Vec` per call.
type Calls = Arc<Mutex<Vec<Vec<u64>>>>;

/// Overrides `handle_batch`; fails the batch at the event of type `Bad`
/// (reporting the events before it as applied).
struct Batches {
    calls: Calls,
    handled: Arc<Mutex<Vec<u64>>>,
}

impl Projection for Batches {
    async fn handle(
        &mut self,
        _: &RecordedEvent,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        panic!("the runner must call handle_batch, not handle");
    }

    async fn handle_batch(
        &mut self,
        events: &[RecordedEvent],
        context: &ProjectionContext,
    ) -> Result<(), BatchFailure> {
        assert_eq!(
            context.position(),
            events.last().unwrap().position,
            "the context is the last event's"
        );
        self.calls
            .lock()
            .unwrap()
            .push(events.iter().map(|e| e.position.0).collect());
        for (index, event) in events.iter().enumerate() {
            if event.event_type == "Bad" {
                return Err(BatchFailure::new(
                    index,
                    ProjectionError::handler(format!("bad at {}", event.position)),
                ));
            }
            self.handled.lock().unwrap().push(event.position.0);
        }
        Ok(())
    }
}

async fn append(store: &dyn EventStore, event_type: &str, count: usize) -> Position {
    let events = (0..count)
        .map(|_| NewEvent::new(event_type, Vec::new()))
        .collect();
    store
        .append(
            &StreamId::new("count-1").unwrap(),
            ExpectedVersion::Any,
            events,
        )
        .await
        .unwrap()
        .last_position
}

fn config(name: &str, policy: FailurePolicy) -> ProjectionConfig {
    ProjectionConfig::builder(name)
        .batch_size(8)
        .failure_policy(policy)
        .build()
        .unwrap()
}

#[tokio::test]
async fn catch_up_and_live_events_arrive_in_batches_without_gap() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    append(&*store, "Fine", 40).await;
    let calls = Calls::default();
    let handled = Arc::new(Mutex::new(Vec::new()));
    let projection = Batches {
        calls: calls.clone(),
        handled: handled.clone(),
    };
    let handle = ProjectionHandle::spawn(
        store.clone(),
        config("batches", FailurePolicy::default()),
        projection,
    )
    .await
    .unwrap();
    handle
        .wait_for(Position(40), Duration::from_secs(10))
        .await
        .unwrap();
    // Live: one append of 20 events is one commit.
    let last = append(&*store, "Fine", 20).await;
    handle
        .wait_for(last, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(*handled.lock().unwrap(), (1..=60).collect::<Vec<u64>>());
    let calls = calls.lock().unwrap().clone();
    assert!(
        calls.iter().all(|call| !call.is_empty() && call.len() <= 8),
        "batches of 1 to 8 events: {calls:?}"
    );
    assert!(
        calls.len() < 60,
        "several events per call, not one call per event: {calls:?}"
    );
    // The 40 events stored before the start came in full batches.
    assert_eq!(calls[0], (1..=8).collect::<Vec<u64>>());
    assert_eq!(handle.shutdown().await.unwrap(), Position(60));
}

#[tokio::test]
async fn a_batch_failing_part_way_keeps_what_it_applied_and_skips_only_the_failing_event() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    append(&*store, "Fine", 5).await;
    append(&*store, "Bad", 1).await; // position 6
    let last = append(&*store, "Fine", 4).await; // 7..=10
    let handled = Arc::new(Mutex::new(Vec::new()));
    let handle = ProjectionHandle::spawn(
        store.clone(),
        config("skipping", FailurePolicy::SkipAndRecord),
        Batches {
            calls: Calls::default(),
            handled: handled.clone(),
        },
    )
    .await
    .unwrap();
    handle
        .wait_for(last, Duration::from_secs(10))
        .await
        .unwrap();
    // 1..=5 once each (not handed again after the failure), 6 skipped.
    assert_eq!(*handled.lock().unwrap(), vec![1, 2, 3, 4, 5, 7, 8, 9, 10]);
    let status = handle.status();
    assert_eq!(status.skipped_total, 1);
    assert_eq!(status.skipped[0].position, Position(6));
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_batch_that_keeps_failing_stops_just_before_the_failing_event() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    append(&*store, "Fine", 3).await;
    let last = append(&*store, "Bad", 1).await; // position 4
    let handled = Arc::new(Mutex::new(Vec::new()));
    let policy = FailurePolicy::Retry {
        max_attempts: 2,
        backoff: Duration::from_millis(1),
    };
    let handle = ProjectionHandle::spawn(
        store.clone(),
        config("stopping", policy),
        Batches {
            calls: Calls::default(),
            handled: handled.clone(),
        },
    )
    .await
    .unwrap();
    match handle.wait_for(last, Duration::from_secs(10)).await {
        Err(ProjectionControlError::NotRunning {
            state: ProjectionState::Failed,
            ..
        }) => {}
        other => panic!("expected the projection to fail, got {other:?}"),
    }
    assert_eq!(*handled.lock().unwrap(), vec![1, 2, 3]);
    let status = handle.status();
    assert_eq!(status.position, Position(3));
    assert_eq!(status.last_error.unwrap().position, Position(4));
    assert_eq!(handle.shutdown().await.unwrap(), Position(3));
}

/// Uses the default `handle_batch`: `handle` per event. Panics on the
/// event at `panic_at`.
struct OneByOne {
    seen: Arc<Mutex<Vec<u64>>>,
    panic_at: u64,
}

impl Projection for OneByOne {
    async fn handle(
        &mut self,
        event: &RecordedEvent,
        context: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        assert_eq!(context.position(), event.position, "each event's own");
        if event.position.0 == self.panic_at {
            panic!("a bug at {}", event.position);
        }
        self.seen.lock().unwrap().push(event.position.0);
        Ok(())
    }
}

#[tokio::test]
async fn the_default_batch_handles_one_event_at_a_time_and_catches_a_panic_at_its_event() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let last = append(&*store, "Fine", 12).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handle = ProjectionHandle::spawn(
        store.clone(),
        config("default", FailurePolicy::SkipAndRecord),
        OneByOne {
            seen: seen.clone(),
            panic_at: 5,
        },
    )
    .await
    .unwrap();
    handle
        .wait_for(last, Duration::from_secs(10))
        .await
        .unwrap();
    // The events before the panic in its batch were applied once.
    let expected: Vec<u64> = (1..=12).filter(|&p| p != 5).collect();
    assert_eq!(*seen.lock().unwrap(), expected);
    let status = handle.status();
    assert_eq!(status.skipped_total, 1);
    assert_eq!(status.skipped[0].position, Position(5));
    assert!(
        status.skipped[0].error.contains("a bug at 5"),
        "{}",
        status.skipped[0].error
    );
    handle.shutdown().await.unwrap();
}

/// A typed projection with its own batch handler: sums what it decoded.
struct Sums {
    calls: Calls,
    total: Arc<Mutex<u64>>,
}

impl TypedProjection for Sums {
    type Event = CountEvent;

    async fn handle(
        &mut self,
        _: CountEvent,
        _: &RecordedEvent,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        panic!("the runner must call handle_batch, not handle");
    }

    async fn handle_batch(
        &mut self,
        events: Vec<(CountEvent, &RecordedEvent)>,
        _: &ProjectionContext,
    ) -> Result<(), BatchFailure> {
        self.calls
            .lock()
            .unwrap()
            .push(events.iter().map(|(_, r)| r.position.0).collect());
        let mut total = self.total.lock().unwrap();
        for (CountEvent::Counted(n), _) in events {
            *total += n;
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_typed_batch_gets_decoded_events_and_stops_before_one_that_does_not_decode() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let stream = StreamId::new("count-1").unwrap();
    let counted = |n| encode_event(&CountEvent::Counted(n)).unwrap();
    store
        .append(
            &stream,
            ExpectedVersion::Any,
            (1..=6).map(counted).collect(),
        )
        .await
        .unwrap();
    // Position 7 does not decode as a `CountEvent`.
    store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![NewEvent::new("Counted", vec![0xFF; 3])],
        )
        .await
        .unwrap();
    let last = store
        .append(&stream, ExpectedVersion::Any, vec![counted(100)])
        .await
        .unwrap()
        .last_position;
    let calls = Calls::default();
    let total = Arc::new(Mutex::new(0));
    let config = ProjectionConfig::builder("typed")
        .filter(EventFilter::Category("count".into()))
        .batch_size(16)
        .failure_policy(FailurePolicy::SkipAndRecord)
        .build()
        .unwrap();
    let handle = ProjectionHandle::spawn(
        store.clone(),
        config,
        Typed(Sums {
            calls: calls.clone(),
            total: total.clone(),
        }),
    )
    .await
    .unwrap();
    handle
        .wait_for(last, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(*total.lock().unwrap(), 21 + 100);
    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        calls[0],
        vec![1, 2, 3, 4, 5, 6],
        "one call up to the bad event"
    );
    assert_eq!(calls.last().unwrap(), &vec![8]);
    let status = handle.status();
    assert_eq!(status.skipped_total, 1);
    assert_eq!(status.skipped[0].position, Position(7));
    handle.shutdown().await.unwrap();
}
