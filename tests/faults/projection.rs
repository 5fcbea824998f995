//! A projection over a failing store: catch-up reads and checkpoint saves
//! fail at random, the live feed is tiny so it keeps falling back to reads,
//! and the projection still handles every event exactly once, in order,
//! reporting the failures in its status.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use annals::projection::{ProjectionContext, ProjectionError};
use annals::store::DEFAULT_MAX_EVENT_SIZE;
use annals::testing::{FaultPlan, FaultyStore};
use annals::{
    EventStore, ExpectedVersion, MemoryStore, NewEvent, Position, Projection, ProjectionConfig,
    ProjectionHandle, RecordedEvent, StreamId,
};

struct Recorder(Arc<Mutex<Vec<Position>>>);

impl Projection for Recorder {
    async fn handle(
        &mut self,
        event: &RecordedEvent,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        tokio::time::sleep(Duration::from_micros(200)).await;
        self.0.lock().unwrap().push(event.position);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_reads_and_checkpoint_saves_lose_and_repeat_nothing() {
    let inner: Arc<dyn EventStore> =
        Arc::new(MemoryStore::with_limits(DEFAULT_MAX_EVENT_SIZE, 2).unwrap());
    let mut plan = FaultPlan::none();
    plan.read_failed = 0.3;
    plan.write_failed = 0.5;
    plan.max_delay = Duration::from_micros(300);
    plan.seed = 42;
    let faulty = Arc::new(FaultyStore::new(Arc::clone(&inner), plan));
    let seen = Arc::new(Mutex::new(Vec::new()));
    // Pages of 64 events: a lagging projection reads often, so reads fail
    // often (the default 4,096 reads a few times a run at this handler's
    // pace; the read ahead's failures are in the subscription's own tests).
    let config = ProjectionConfig::builder("faults")
        .checkpoint_every(20, Duration::from_millis(10))
        .batch_size(8)
        .read_page_size(64);
    let store: Arc<dyn EventStore> = faulty.clone();
    let handle = loop {
        // Loading the checkpoint may fail too: that is a typed error.
        match ProjectionHandle::spawn(
            Arc::clone(&store),
            config.clone().build().unwrap(),
            Recorder(Arc::clone(&seen)),
        )
        .await
        {
            Ok(handle) => break handle,
            Err(annals::projection::ProjectionControlError::Read(_)) => continue,
            Err(other) => panic!("unexpected error: {other}"),
        }
    };
    let mut last = Position::START;
    // At least 400 events, and on until a read has failed: on a loaded
    // machine the projection may keep up from the live feed for a while,
    // and a run in which no read failed would prove nothing.
    let mut i = 0u32;
    while i < 400 || faulty.counts().reads_failed == 0 {
        assert!(i < 100_000, "no read failed: {:?}", faulty.counts());
        i += 1;
        let stream = StreamId::new(format!("order-{}", i % 7)).unwrap();
        // Appends go to the healthy inner store: this test is about reads.
        last = inner
            .append(
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::new("Happened", Vec::new())],
            )
            .await
            .unwrap()
            .last_position;
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    handle
        .wait_for(last, Duration::from_secs(30))
        .await
        .unwrap();
    let counts = faulty.counts();
    assert!(
        counts.reads_failed > 0 && counts.writes_failed > 0,
        "{counts:?}"
    );
    assert!(
        handle.status().last_error.is_some(),
        "failures are reported"
    );
    assert_eq!(
        *seen.lock().unwrap(),
        (1..=last.0).map(Position).collect::<Vec<_>>()
    );

    faulty.heal();
    assert_eq!(handle.shutdown().await.unwrap(), last);
    assert_eq!(inner.load_checkpoint("faults").await.unwrap(), Some(last));
}
