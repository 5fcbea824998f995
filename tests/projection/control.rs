//! Operating a projection through its handle: read-your-writes with
//! `wait_for` (and its typed timeout), status and lag, pause and resume, the
//! failure policies (retry then stop; skip and record), shutdown saving the
//! checkpoint, a restart that continues after it, handling that goes on
//! while a checkpoint save waits for the store, and the end of a projection
//! when the store shuts down.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use annals::projection::{
    FailurePolicy, ProjectionContext, ProjectionControlError, ProjectionError, ProjectionState,
};
use annals::store::{
    AppendError, AppendResult, EventFilter, LiveFeed, ReadDirection, ReadError, Snapshot,
};
use annals::{
    EventStore, ExpectedVersion, MemoryStore, NewEvent, Position, Projection, ProjectionConfig,
    ProjectionHandle, RecordedEvent, SledStore, StoreError, StreamId, Version,
};
use async_trait::async_trait;
use tokio::sync::Semaphore;

/// Records the positions it handled. Fails on events of type `Poison`
/// unless `healed`, and panics on `Panic`.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Position>>>,
    poison_tries: Arc<AtomicU32>,
    healed: Arc<AtomicBool>,
}

impl Projection for Recorder {
    async fn handle(
        &mut self,
        event: &RecordedEvent,
        context: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        match event.event_type.as_str() {
            "Poison" if !self.healed.load(Ordering::SeqCst) => {
                let tries = self.poison_tries.fetch_add(1, Ordering::SeqCst) + 1;
                assert_eq!(context.attempt(), tries, "attempts are counted per event");
                return Err(ProjectionError::handler(format!(
                    "poisoned at {}",
                    context.position()
                )));
            }
            "Panic" => panic!("the handler panicked at {}", context.position()),
            _ => {}
        }
        self.seen.lock().unwrap().push(event.position);
        Ok(())
    }
}

impl Recorder {
    fn seen(&self) -> Vec<Position> {
        self.seen.lock().unwrap().clone()
    }
}

async fn append(store: &dyn EventStore, stream: &str, event_type: &str) -> AppendResult {
    store
        .append(
            &StreamId::new(stream).unwrap(),
            ExpectedVersion::Any,
            vec![NewEvent::new(event_type, Vec::new())],
        )
        .await
        .unwrap()
}

async fn append_many(store: &dyn EventStore, count: usize) -> Position {
    let mut last = Position::START;
    for i in 0..count {
        last = append(store, &format!("order-{}", i % 3), "Happened")
            .await
            .last_position;
    }
    last
}

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn wait_for_gives_read_your_writes_and_a_typed_timeout() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let recorder = Recorder::default();
    let handle = ProjectionHandle::spawn(
        Arc::clone(&store),
        ProjectionConfig::builder("orders").build().unwrap(),
        recorder.clone(),
    )
    .await
    .unwrap();
    for _ in 0..20 {
        let appended = append(&*store, "order-1", "Happened").await;
        let reached = handle.wait_for(appended.last_position, WAIT).await.unwrap();
        assert!(reached >= appended.last_position);
        // Read-your-writes: the handler has seen it when wait_for returns.
        assert!(recorder.seen().contains(&appended.last_position));
    }
    let head = store.head_position();
    let status = handle.status();
    assert_eq!(
        (status.state, status.position, status.lag),
        (ProjectionState::Running, head, 0)
    );
    assert_eq!(status.events_handled, 20);

    match handle
        .wait_for(Position(head.0 + 5), Duration::from_millis(50))
        .await
    {
        Err(ProjectionControlError::Timeout {
            target, reached, ..
        }) => {
            assert_eq!(target, Position(head.0 + 5));
            assert_eq!(reached, head);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_filtered_projection_passes_positions_it_does_not_handle() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let recorder = Recorder::default();
    let handle = ProjectionHandle::spawn(
        Arc::clone(&store),
        ProjectionConfig::builder("users")
            .filter(EventFilter::Category("user".into()))
            .build()
            .unwrap(),
        recorder.clone(),
    )
    .await
    .unwrap();
    let user = append(&*store, "user-1", "Registered").await.last_position;
    let order = append(&*store, "order-1", "Placed").await.last_position;
    // The order event is not the projection's, yet waiting for it returns:
    // the projection has passed it.
    handle.wait_for(order, WAIT).await.unwrap();
    assert_eq!(recorder.seen(), vec![user]);
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn pause_stops_handling_and_resume_catches_up() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let recorder = Recorder::default();
    let handle = ProjectionHandle::spawn(
        Arc::clone(&store),
        ProjectionConfig::builder("orders").build().unwrap(),
        recorder.clone(),
    )
    .await
    .unwrap();
    let first = append_many(&*store, 5).await;
    handle.wait_for(first, WAIT).await.unwrap();

    handle.pause().await.unwrap();
    let status = handle.status();
    assert_eq!(status.state, ProjectionState::Paused);
    assert_eq!(status.checkpoint, first, "pausing saves the checkpoint");
    let last = append_many(&*store, 5).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(recorder.seen().len(), 5, "nothing handled while paused");
    assert_eq!(handle.status().lag, last.0 - first.0);
    assert!(matches!(
        handle.wait_for(last, Duration::from_millis(30)).await,
        Err(ProjectionControlError::Timeout { .. })
    ));

    handle.resume().await.unwrap();
    handle.wait_for(last, WAIT).await.unwrap();
    assert_eq!(
        recorder.seen(),
        (1..=last.0).map(Position).collect::<Vec<_>>()
    );
    assert_eq!(handle.status().state, ProjectionState::Running);
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn retry_then_stop_and_report_then_resume() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let recorder = Recorder::default();
    let config = ProjectionConfig::builder("orders").failure_policy(FailurePolicy::Retry {
        max_attempts: 3,
        backoff: Duration::from_millis(5),
    });
    let handle = ProjectionHandle::spawn(
        Arc::clone(&store),
        config.build().unwrap(),
        recorder.clone(),
    )
    .await
    .unwrap();
    let before = append_many(&*store, 4).await;
    let poison = append(&*store, "order-9", "Poison").await.last_position;
    let after = append_many(&*store, 3).await;

    match handle.wait_for(after, WAIT).await {
        Err(ProjectionControlError::NotRunning {
            state, last_error, ..
        }) => {
            assert_eq!(state, ProjectionState::Failed);
            assert!(last_error.unwrap().contains("poisoned"));
        }
        other => panic!("expected the projection to stop, got {other:?}"),
    }
    let status = handle.status();
    assert_eq!(status.state, ProjectionState::Failed);
    assert_eq!(
        status.position, before,
        "stopped just before the failing event"
    );
    let failure = status.last_error.unwrap();
    assert_eq!((failure.position, failure.attempts), (poison, 3));
    assert_eq!(recorder.poison_tries.load(Ordering::SeqCst), 3);
    assert_eq!(
        recorder.seen(),
        (1..=before.0).map(Position).collect::<Vec<_>>()
    );
    assert_eq!(store.load_checkpoint("orders").await.unwrap(), Some(before));

    // Fixed, it is resumed and goes on from the failing event.
    recorder.healed.store(true, Ordering::SeqCst);
    handle.resume().await.unwrap();
    handle.wait_for(after, WAIT).await.unwrap();
    assert_eq!(
        recorder.seen(),
        (1..=after.0).map(Position).collect::<Vec<_>>()
    );
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_retry_that_succeeds_goes_on() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    /// Fails twice, then succeeds.
    struct Flaky(Arc<AtomicU32>, Arc<Mutex<Vec<Position>>>);
    impl Projection for Flaky {
        async fn handle(
            &mut self,
            event: &RecordedEvent,
            _: &ProjectionContext,
        ) -> Result<(), ProjectionError> {
            if event.position == Position(2) && self.0.fetch_add(1, Ordering::SeqCst) < 2 {
                return Err(ProjectionError::handler("not yet"));
            }
            self.1.lock().unwrap().push(event.position);
            Ok(())
        }
    }
    let tries = Arc::new(AtomicU32::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let config = ProjectionConfig::builder("flaky").failure_policy(FailurePolicy::Retry {
        max_attempts: 3,
        backoff: Duration::from_millis(5),
    });
    let handle = ProjectionHandle::spawn(
        Arc::clone(&store),
        config.build().unwrap(),
        Flaky(Arc::clone(&tries), Arc::clone(&seen)),
    )
    .await
    .unwrap();
    let last = append_many(&*store, 4).await;
    handle.wait_for(last, WAIT).await.unwrap();
    assert_eq!(tries.load(Ordering::SeqCst), 3);
    assert_eq!(
        *seen.lock().unwrap(),
        (1..=4).map(Position).collect::<Vec<_>>()
    );
    let status = handle.status();
    assert_eq!(status.state, ProjectionState::Running);
    assert_eq!(
        status.last_error.unwrap().attempts,
        2,
        "the last failure stays reported"
    );
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn attempts_are_counted_per_event_not_carried_to_the_next() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    /// Fails once on each of positions 2 and 4, and records the attempt the
    /// context reports for each failure.
    struct FailsOnceEach(Arc<Mutex<Vec<(Position, u32)>>>);
    impl Projection for FailsOnceEach {
        async fn handle(
            &mut self,
            event: &RecordedEvent,
            context: &ProjectionContext,
        ) -> Result<(), ProjectionError> {
            let mut failures = self.0.lock().unwrap();
            let failed_before = failures.iter().any(|(p, _)| *p == event.position);
            if matches!(event.position.0, 2 | 4) && !failed_before {
                failures.push((event.position, context.attempt()));
                return Err(ProjectionError::handler("once"));
            }
            Ok(())
        }
    }
    // Appended before the projection starts: one catch-up batch holds them
    // all, so the retried batch runs on into the second failing event.
    let last = append_many(&*store, 5).await;
    let failures = Arc::new(Mutex::new(Vec::new()));
    let config = ProjectionConfig::builder("once-each").failure_policy(FailurePolicy::Retry {
        max_attempts: 2,
        backoff: Duration::from_millis(5),
    });
    let handle = ProjectionHandle::spawn(
        Arc::clone(&store),
        config.build().unwrap(),
        FailsOnceEach(Arc::clone(&failures)),
    )
    .await
    .unwrap();
    handle.wait_for(last, WAIT).await.unwrap();
    assert_eq!(handle.status().state, ProjectionState::Running);
    assert_eq!(
        *failures.lock().unwrap(),
        vec![(Position(2), 1), (Position(4), 1)],
        "each event's first failure is its first attempt"
    );
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn skip_and_record_never_skips_silently() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let recorder = Recorder::default();
    let config = ProjectionConfig::builder("orders").failure_policy(FailurePolicy::SkipAndRecord);
    let handle = ProjectionHandle::spawn(
        Arc::clone(&store),
        config.build().unwrap(),
        recorder.clone(),
    )
    .await
    .unwrap();
    append_many(&*store, 2).await;
    let poison = append(&*store, "order-7", "Poison").await.last_position;
    append_many(&*store, 2).await;
    let panic = append(&*store, "order-8", "Panic").await.last_position;
    let last = append_many(&*store, 2).await;

    handle.wait_for(last, WAIT).await.unwrap();
    let status = handle.status();
    assert_eq!(status.state, ProjectionState::Running);
    assert_eq!(status.skipped_total, 2);
    let skipped: Vec<Position> = status.skipped.iter().map(|s| s.position).collect();
    assert_eq!(skipped, vec![poison, panic]);
    assert_eq!(status.skipped[0].event_type, "Poison");
    assert!(status.skipped[0].error.contains("poisoned"));
    assert!(
        status.skipped[1].error.contains("panicked"),
        "{}",
        status.skipped[1].error
    );
    let handled: Vec<Position> = (1..=last.0)
        .map(Position)
        .filter(|p| *p != poison && *p != panic)
        .collect();
    assert_eq!(recorder.seen(), handled);
    assert_eq!(handle.shutdown().await.unwrap(), last);
}

#[tokio::test]
async fn shutdown_saves_the_checkpoint_and_a_restart_continues_after_it() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let first = Recorder::default();
    // A checkpoint only every 1000 events or hour: only shutdown saves it.
    let config =
        ProjectionConfig::builder("orders").checkpoint_every(1000, Duration::from_secs(3600));
    let handle = ProjectionHandle::spawn(
        Arc::clone(&store),
        config.clone().build().unwrap(),
        first.clone(),
    )
    .await
    .unwrap();
    let middle = append_many(&*store, 10).await;
    handle.wait_for(middle, WAIT).await.unwrap();
    assert_eq!(store.load_checkpoint("orders").await.unwrap(), None);
    assert_eq!(handle.shutdown().await.unwrap(), middle);
    assert_eq!(
        handle.shutdown().await.unwrap(),
        middle,
        "shutdown twice is fine"
    );
    assert_eq!(handle.status().state, ProjectionState::Stopped);
    assert_eq!(store.load_checkpoint("orders").await.unwrap(), Some(middle));
    assert!(matches!(
        handle.pause().await,
        Err(ProjectionControlError::NotRunning {
            state: ProjectionState::Stopped,
            ..
        })
    ));

    let last = append_many(&*store, 10).await;
    let second = Recorder::default();
    let handle =
        ProjectionHandle::spawn(Arc::clone(&store), config.build().unwrap(), second.clone())
            .await
            .unwrap();
    handle.wait_for(last, WAIT).await.unwrap();
    assert_eq!(
        second.seen(),
        (middle.0 + 1..=last.0).map(Position).collect::<Vec<_>>(),
        "the restart begins right after the checkpoint"
    );
    handle.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_checkpoint_is_saved_on_a_timer_when_idle() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let config =
        ProjectionConfig::builder("orders").checkpoint_every(1000, Duration::from_millis(500));
    let handle = ProjectionHandle::spawn(
        Arc::clone(&store),
        config.build().unwrap(),
        Recorder::default(),
    )
    .await
    .unwrap();
    let last = append_many(&*store, 3).await;
    handle.wait_for(last, WAIT).await.unwrap();
    assert_eq!(store.load_checkpoint("orders").await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(store.load_checkpoint("orders").await.unwrap(), Some(last));
    assert_eq!(handle.status().checkpoint, last);
    handle.shutdown().await.unwrap();
}

/// A memory store whose checkpoint saves wait at a gate, as a save waits for
/// the disk's sync.
#[derive(Debug)]
struct SlowCheckpoints {
    inner: MemoryStore,
    gate: Arc<Semaphore>,
    saves_started: AtomicU32,
    /// Writes the checkpoint before waiting at the gate (a save the store
    /// took, whose sync is slow), rather than after.
    write_first: bool,
}

#[async_trait]
impl EventStore for SlowCheckpoints {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, AppendError> {
        self.inner.append(stream, expected, events).await
    }
    async fn read_stream(
        &self,
        stream: &StreamId,
        from: Version,
        direction: ReadDirection,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.inner.read_stream(stream, from, direction, limit).await
    }
    async fn stream_version(&self, stream: &StreamId) -> Result<Version, ReadError> {
        self.inner.stream_version(stream).await
    }
    async fn read_all(
        &self,
        from: Position,
        direction: ReadDirection,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.inner.read_all(from, direction, limit, filter).await
    }
    fn head_position(&self) -> Position {
        self.inner.head_position()
    }
    fn subscribe_live(&self) -> LiveFeed {
        self.inner.subscribe_live()
    }
    async fn save_snapshot(&self, stream: &StreamId, snapshot: Snapshot) -> Result<(), StoreError> {
        self.inner.save_snapshot(stream, snapshot).await
    }
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, ReadError> {
        self.inner.load_snapshot(stream).await
    }
    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), StoreError> {
        self.inner.delete_snapshot(stream).await
    }
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        self.saves_started.fetch_add(1, Ordering::SeqCst);
        if self.write_first {
            self.inner.save_checkpoint(name, position).await?;
        }
        let _permit = self.gate.acquire().await.expect("the gate stays open");
        if !self.write_first {
            self.inner.save_checkpoint(name, position).await?;
        }
        Ok(())
    }
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, ReadError> {
        self.inner.load_checkpoint(name).await
    }
    async fn shutdown(&self) -> Result<(), StoreError> {
        self.inner.shutdown().await
    }
}

#[tokio::test]
async fn handling_goes_on_while_a_checkpoint_save_waits_for_the_store() {
    let slow = Arc::new(SlowCheckpoints {
        inner: MemoryStore::new(),
        gate: Arc::new(Semaphore::new(0)),
        saves_started: AtomicU32::new(0),
        write_first: false,
    });
    let store: Arc<dyn EventStore> = slow.clone();
    let head = append_many(&*store, 100).await;
    let config = ProjectionConfig::builder("orders")
        .checkpoint_every(10, Duration::from_secs(3600))
        .batch_size(5);
    let recorder = Recorder::default();
    let handle = ProjectionHandle::spawn(
        Arc::clone(&store),
        config.build().unwrap(),
        recorder.clone(),
    )
    .await
    .unwrap();
    // A save starts after 10 events and cannot finish: the events after it
    // are handled all the same, and no second save overtakes the first.
    handle.wait_for(head, WAIT).await.unwrap();
    assert_eq!(recorder.seen().len(), 100);
    let status = handle.status();
    assert_eq!(status.checkpoint, Position::START, "not saved yet");
    assert_eq!(slow.saves_started.load(Ordering::SeqCst), 1);
    assert_eq!(store.load_checkpoint("orders").await.unwrap(), None);

    // Once the store answers, the checkpoint moves; shutdown saves the rest.
    slow.gate.add_permits(1_000);
    assert_eq!(handle.shutdown().await.unwrap(), head);
    assert_eq!(store.load_checkpoint("orders").await.unwrap(), Some(head));
}

#[tokio::test]
async fn a_projection_ends_when_the_store_shuts_down() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let recorder = Recorder::default();
    let handle = ProjectionHandle::spawn(
        Arc::clone(&store),
        ProjectionConfig::builder("orders").build().unwrap(),
        recorder.clone(),
    )
    .await
    .unwrap();
    let last = append_many(&*store, 5).await;
    handle.wait_for(last, WAIT).await.unwrap();
    store.shutdown().await.unwrap();
    // Nothing more can arrive: waiting for more answers at once.
    assert!(matches!(
        handle.wait_for(last.next(), WAIT).await,
        Err(ProjectionControlError::NotRunning {
            state: ProjectionState::Ended,
            ..
        })
    ));
    let status = handle.status();
    assert_eq!(
        (status.state, status.position),
        (ProjectionState::Ended, last)
    );
    assert_eq!(recorder.seen().len(), 5);
    // The wrong order: a store refuses checkpoints after its shutdown (the
    // memory store as the sled store, see the next test), so the final save
    // fails; the actor stops all the same.
    assert!(matches!(
        handle.shutdown().await,
        Err(ProjectionControlError::Store(StoreError::Closed))
    ));
    assert_eq!(handle.status().state, ProjectionState::Stopped);
}

#[tokio::test]
async fn a_projection_shut_down_after_a_sled_store_cannot_save_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> = Arc::new(SledStore::open(dir.path()).unwrap());
    let handle = ProjectionHandle::spawn(
        Arc::clone(&store),
        ProjectionConfig::builder("orders").build().unwrap(),
        Recorder::default(),
    )
    .await
    .unwrap();
    let last = append_many(&*store, 5).await;
    handle.wait_for(last, WAIT).await.unwrap();
    store.shutdown().await.unwrap();
    assert!(matches!(
        handle.wait_for(last.next(), WAIT).await,
        Err(ProjectionControlError::NotRunning {
            state: ProjectionState::Ended,
            ..
        })
    ));
    // The wrong order: the save needs the store's writer, which is gone.
    // The actor stops all the same, and a second call says the same.
    for _ in 0..2 {
        assert!(matches!(
            handle.shutdown().await,
            Err(ProjectionControlError::Store(StoreError::Closed))
        ));
    }
    assert_eq!(handle.status().state, ProjectionState::Stopped);
}

#[tokio::test]
async fn a_save_under_way_when_the_store_shuts_down_reaches_the_status() {
    let slow = Arc::new(SlowCheckpoints {
        inner: MemoryStore::new(),
        gate: Arc::new(Semaphore::new(0)),
        saves_started: AtomicU32::new(0),
        // The store took the save before it shut down; only its sync waits.
        write_first: true,
    });
    let store: Arc<dyn EventStore> = slow.clone();
    let last = append_many(&*store, 20).await;
    let config = ProjectionConfig::builder("orders")
        .checkpoint_every(10, Duration::from_secs(3600))
        .batch_size(5);
    let handle = ProjectionHandle::spawn(
        Arc::clone(&store),
        config.build().unwrap(),
        Recorder::default(),
    )
    .await
    .unwrap();
    // A save of position 10 starts and waits at the gate.
    handle.wait_for(last, WAIT).await.unwrap();
    assert_eq!(slow.saves_started.load(Ordering::SeqCst), 1);
    assert_eq!(handle.status().checkpoint, Position::START);

    store.shutdown().await.unwrap();
    // Lets the actor reach the end of the feed while the save still waits.
    tokio::time::sleep(Duration::from_millis(100)).await;
    slow.gate.add_permits(1_000);
    assert!(matches!(
        handle.wait_for(last.next(), WAIT).await,
        Err(ProjectionControlError::NotRunning {
            state: ProjectionState::Ended,
            ..
        })
    ));
    // Ended, and the save that was under way shows in the status.
    assert_eq!(handle.status().checkpoint, Position(10));
    assert_eq!(
        store.load_checkpoint("orders").await.unwrap(),
        Some(Position(10))
    );
    // The final save comes after the store's shutdown, which refuses it.
    assert!(matches!(
        handle.shutdown().await,
        Err(ProjectionControlError::Store(StoreError::Closed))
    ));
}

#[tokio::test]
async fn one_running_projection_per_name_and_store() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let config = ProjectionConfig::builder("orders");
    let first = ProjectionHandle::spawn(
        Arc::clone(&store),
        config.clone().build().unwrap(),
        Recorder::default(),
    )
    .await
    .unwrap();
    assert!(matches!(
        ProjectionHandle::spawn(
            Arc::clone(&store),
            config.clone().build().unwrap(),
            Recorder::default()
        )
        .await,
        Err(ProjectionControlError::AlreadyRunning { .. })
    ));
    // The same name on another store is another projection.
    let other: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let elsewhere =
        ProjectionHandle::spawn(other, config.clone().build().unwrap(), Recorder::default())
            .await
            .unwrap();
    first.shutdown().await.unwrap();
    let again = ProjectionHandle::spawn(
        Arc::clone(&store),
        config.build().unwrap(),
        Recorder::default(),
    )
    .await
    .unwrap();
    again.shutdown().await.unwrap();
    elsewhere.shutdown().await.unwrap();
}
