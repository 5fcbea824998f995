//! The read-model capability and the typed read-model API on the sled
//! store: typed round-trips through a batch and a reader's view, readers
//! kept out of the store's trees, the fenced commit, and batch handlers
//! that see the same events as per-event ones.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use annals::projection::{
    FailurePolicy, ProjectionContext, ProjectionControlError, ProjectionError, ProjectionState,
    SledProjection,
};
use annals::store::{Durability, ReadModelBatch, ReadModelError, ReadModelStore, SledStoreConfig};
use annals::{
    EventStore, ExpectedVersion, InvalidInput, NewEvent, Position, ProjectionConfig,
    ProjectionHandle, RecordedEvent, SledStore, StoreError, StreamId,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

fn open() -> (tempfile::TempDir, Arc<SledStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store =
        SledStore::open_with(SledStoreConfig::new(dir.path()).durability(Durability::Flush))
            .unwrap();
    (dir, Arc::new(store))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Customer {
    name: String,
    orders: Vec<u32>,
}

#[tokio::test]
async fn typed_values_round_trip_through_a_batch_and_a_view() {
    let (_dir, store) = open();
    let trees = vec!["rm-customers".to_owned(), "rm-by-day".to_owned()];
    let mut batch = store.begin("typed", &trees).await.unwrap();
    let id = Uuid::now_v7();
    let alice = Customer {
        name: "alice".into(),
        orders: vec![3, 1],
    };
    batch.put("rm-customers", &id, &alice).unwrap();
    // Reads in the batch see its own writes, typed.
    assert_eq!(
        batch.get::<Customer>("rm-customers", &id).unwrap(),
        Some(alice.clone())
    );
    for day in [-2i64, 7, -30, 0, 12] {
        for shop in ["b", "a"] {
            batch
                .put("rm-by-day", &(day, shop.to_owned()), &(day * 10))
                .unwrap();
        }
    }
    assert_eq!(
        batch
            .update::<u64>("rm-customers", "count", |n| n + 1)
            .unwrap(),
        1
    );
    assert_eq!(
        batch
            .update::<u64>("rm-customers", "count", |n| n + 5)
            .unwrap(),
        6
    );
    batch
        .put("rm-by-day", &(99i64, "gone".to_owned()), &0i64)
        .unwrap();
    batch
        .remove("rm-by-day", &(99i64, "gone".to_owned()))
        .unwrap();
    store
        .commit(batch, "typed", None, Position(1))
        .await
        .unwrap();

    let customers = store.read_model::<Uuid, Customer>("rm-customers").unwrap();
    assert_eq!(customers.get(&id).unwrap(), Some(alice));
    assert_eq!(customers.get(&Uuid::nil()).unwrap(), None);
    let count = store.read_model::<str, u64>("rm-customers").unwrap();
    assert_eq!(count.get("count").unwrap(), Some(6));
    // A value of another type is a typed error, not garbage.
    assert!(matches!(
        store
            .read_model::<str, Customer>("rm-customers")
            .unwrap()
            .get("count"),
        Err(ReadModelError::Codec(_))
    ));

    let by_day = store.read_model::<(i64, String), i64>("rm-by-day").unwrap();
    assert_eq!(by_day.len().unwrap(), 10);
    let all = by_day.iter().unwrap();
    let keys: Vec<(i64, String)> = all.iter().map(|(key, _)| key.clone()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "keys come back in the order of the values");
    assert_eq!(keys[0], (-30, "a".to_owned()));
    // Negative days sort before positive ones: a range is a range of values.
    let range = by_day
        .range((-2, String::new())..(7, String::new()))
        .unwrap();
    assert_eq!(
        range,
        vec![
            ((-2, "a".to_owned()), -20),
            ((-2, "b".to_owned()), -20),
            ((0, "a".to_owned()), 0),
            ((0, "b".to_owned()), 0),
        ]
    );
    assert_eq!(
        store.load_checkpoint("typed").await.unwrap(),
        Some(Position(1))
    );
}

#[tokio::test]
async fn a_reader_cannot_open_the_stores_trees() {
    let (_dir, store) = open();
    for tree in [
        "log",
        "checkpoints",
        "snapshots",
        "logbook",
        "__sled__default",
    ] {
        assert!(
            matches!(
                store.read_model::<str, u64>(tree),
                Err(ReadModelError::InvalidInput(
                    InvalidInput::ReservedName { .. }
                ))
            ),
            "{tree} must be refused"
        );
    }
    assert!(matches!(
        store.read_model::<str, u64>(""),
        Err(ReadModelError::InvalidInput(InvalidInput::EmptyName { .. }))
    ));
    // A read-model tree is fine, and the store's trees are refused to
    // writers too.
    assert!(store.read_model::<str, u64>("rm-ok").is_ok());
    assert!(matches!(
        store.begin("sneaky", &["checkpoints".to_owned()]).await,
        Err(StoreError::InvalidInput(InvalidInput::ReservedName { .. }))
    ));
}

#[tokio::test]
async fn a_view_fails_with_closed_after_shutdown() {
    let (_dir, store) = open();
    let view = store.read_model::<str, u64>("rm-after").unwrap();
    assert_eq!(view.get("k").unwrap(), None);
    store.shutdown().await.unwrap();
    assert!(matches!(
        view.get("k"),
        Err(ReadModelError::Store(StoreError::Closed))
    ));
}

#[tokio::test]
async fn a_commit_from_a_stale_checkpoint_is_refused_and_writes_nothing() {
    let (_dir, store) = open();
    let trees = vec!["rm-fenced".to_owned()];
    let mut first = store.begin("fenced", &trees).await.unwrap();
    first.put("rm-fenced", "a", &1u64).unwrap();
    store
        .commit(first, "fenced", None, Position(5))
        .await
        .unwrap();

    // A runner that still believes there is no checkpoint (it lost its
    // lease to the one above).
    let mut stale = store.begin("fenced", &trees).await.unwrap();
    stale.put("rm-fenced", "a", &2u64).unwrap();
    stale.put("rm-fenced", "b", &2u64).unwrap();
    match store.commit(stale, "fenced", None, Position(9)).await {
        Err(StoreError::CheckpointMoved {
            name,
            expected,
            found,
        }) => {
            assert_eq!(name, "fenced");
            assert_eq!(expected, None);
            assert_eq!(found, Some(Position(5)));
        }
        other => panic!("expected CheckpointMoved, got {other:?}"),
    }
    // And one from a checkpoint that is not the stored one.
    let stale = store.begin("fenced", &trees).await.unwrap();
    assert!(matches!(
        store
            .commit(stale, "fenced", Some(Position(4)), Position(9))
            .await,
        Err(StoreError::CheckpointMoved { .. })
    ));

    let view = store.read_model::<String, u64>("rm-fenced").unwrap();
    assert_eq!(view.iter().unwrap(), vec![("a".to_owned(), 1)]);
    assert_eq!(
        store.load_checkpoint("fenced").await.unwrap(),
        Some(Position(5))
    );
    // The rightful runner goes on.
    let next = store.begin("fenced", &trees).await.unwrap();
    store
        .commit(next, "fenced", Some(Position(5)), Position(6))
        .await
        .unwrap();
    assert_eq!(
        store.load_checkpoint("fenced").await.unwrap(),
        Some(Position(6))
    );
}

/// Counts events per stream.
struct Counts;

impl SledProjection for Counts {
    fn trees(&self) -> Vec<String> {
        vec!["rm-counts".into()]
    }

    fn handle(
        &mut self,
        event: &RecordedEvent,
        batch: &mut ReadModelBatch,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        batch.update::<u64>("rm-counts", event.stream_id.as_str(), |n| n + 1)?;
        Ok(())
    }
}

async fn append(store: &SledStore, stream: &str, count: usize) -> Position {
    let events = (0..count)
        .map(|_| NewEvent::new("Happened", Vec::new()))
        .collect();
    store
        .append(
            &StreamId::new(stream).unwrap(),
            ExpectedVersion::Any,
            events,
        )
        .await
        .unwrap()
        .last_position
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_whose_checkpoint_was_moved_stops_and_writes_nothing() {
    let (_dir, store) = open();
    let first = append(&store, "order-1", 10).await;
    let config = ProjectionConfig::builder("counts").checkpoint_every(1, Duration::from_millis(1));
    let handle = ProjectionHandle::spawn_sled(Arc::clone(&store), config.build().unwrap(), Counts)
        .await
        .unwrap();
    handle.wait_for(first, WAIT).await.unwrap();
    // Something else takes the checkpoint over (a second process, a
    // runner that survived a lost lease).
    store.save_checkpoint("counts", Position(3)).await.unwrap();
    let last = append(&store, "order-1", 5).await;
    assert!(matches!(
        handle.wait_for(last, WAIT).await,
        Err(ProjectionControlError::NotRunning {
            state: ProjectionState::Failed,
            ..
        })
    ));
    let status = handle.status();
    let error = status
        .last_error
        .expect("the failure is in the status")
        .error;
    assert!(error.contains("another runner moved it"), "{error}");
    let counts = store.read_model::<str, u64>("rm-counts").unwrap();
    assert_eq!(counts.get("order-1").unwrap(), Some(10));
    assert_eq!(
        store.load_checkpoint("counts").await.unwrap(),
        Some(Position(3))
    );
    let _ = handle.shutdown().await;
}

/// Writes one key per event, and counts its calls; the per-event one uses
/// the default `handle_batch`, the batch one writes the whole batch in one
/// call. Both refuse events of type `Bad`.
#[derive(Clone)]
struct Recorder {
    tree: &'static str,
    batched: bool,
    calls: Arc<Mutex<(usize, Vec<Position>)>>,
}

impl Recorder {
    fn record(
        &self,
        event: &RecordedEvent,
        batch: &mut ReadModelBatch,
    ) -> Result<(), ProjectionError> {
        if event.event_type == "Bad" {
            return Err(ProjectionError::handler("bad event"));
        }
        batch.put(self.tree, &event.position, &event.stream_id.to_string())?;
        batch.update::<u64>(self.tree, &Position(0), |n| n + 1)?;
        Ok(())
    }
}

impl SledProjection for Recorder {
    fn trees(&self) -> Vec<String> {
        vec![self.tree.into()]
    }

    fn handle(
        &mut self,
        event: &RecordedEvent,
        batch: &mut ReadModelBatch,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        let mut calls = self.calls.lock().unwrap();
        calls.0 += 1;
        calls.1.push(event.position);
        drop(calls);
        self.record(event, batch)
    }

    fn handle_batch(
        &mut self,
        events: &[RecordedEvent],
        batch: &mut ReadModelBatch,
        context: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        if !self.batched {
            for event in events {
                self.handle(event, batch, context)?;
            }
            return Ok(());
        }
        let mut calls = self.calls.lock().unwrap();
        calls.0 += 1;
        calls.1.extend(events.iter().map(|event| event.position));
        drop(calls);
        assert_eq!(context.position(), events.last().unwrap().position);
        events
            .iter()
            .try_for_each(|event| self.record(event, batch))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_handler_sees_the_same_events_as_a_per_event_one() {
    let (_dir, store) = open();
    let mut last = Position::START;
    for round in 0..40 {
        last = append(&store, &format!("order-{}", round % 7), 1 + round % 4).await;
        if round % 9 == 4 {
            let bad = vec![NewEvent::new("Bad", Vec::new())];
            store
                .append(
                    &StreamId::new("order-bad").unwrap(),
                    ExpectedVersion::Any,
                    bad,
                )
                .await
                .unwrap();
        }
    }
    let mut handles = Vec::new();
    let mut recorders = Vec::new();
    for (name, tree, batched) in [("per-event", "rm-one", false), ("batched", "rm-many", true)] {
        let recorder = Recorder {
            tree,
            batched,
            calls: Arc::default(),
        };
        let config = ProjectionConfig::builder(name)
            .batch_size(16)
            .failure_policy(FailurePolicy::SkipAndRecord);
        handles.push(
            ProjectionHandle::spawn_sled(
                Arc::clone(&store),
                config.build().unwrap(),
                recorder.clone(),
            )
            .await
            .unwrap(),
        );
        recorders.push(recorder);
    }
    for handle in &handles {
        handle.wait_for(last, WAIT).await.unwrap();
    }
    let one = store.read_model::<Position, String>("rm-one").unwrap();
    let many = store.read_model::<Position, String>("rm-many").unwrap();
    let one_entries = one.range(Position(1)..).unwrap();
    assert_eq!(one_entries, many.range(Position(1)..).unwrap());
    let counted = store.read_model::<Position, u64>("rm-many").unwrap();
    assert_eq!(
        counted.get(&Position(0)).unwrap(),
        Some(one_entries.len() as u64)
    );
    // Every good event is in, no bad one: the batch's failure fell back to
    // one event at a time, and the policy skipped the bad events alone.
    let skipped: Vec<u64> = [&handles[0], &handles[1]]
        .iter()
        .map(|handle| handle.status().skipped_total)
        .collect();
    assert_eq!(skipped[0], skipped[1]);
    assert_eq!(skipped[0], 4);
    assert_eq!(one_entries.len() as u64, last.0 - skipped[0]);
    let (per_event_calls, _) = recorders[0].calls.lock().unwrap().clone();
    let (batch_calls, _) = recorders[1].calls.lock().unwrap().clone();
    assert!(
        batch_calls < per_event_calls / 2,
        "{batch_calls} batch calls for {per_event_calls} events"
    );
    for handle in handles {
        handle.shutdown().await.unwrap();
    }
}
