//! Restart from checkpoint with a sled read model: nothing lost, nothing
//! applied twice, including across a real `kill -9` of a child process that
//! appends and projects at full speed.
//!
//! The test re-executes its own binary in a child role (selected by an
//! environment variable), SIGKILLs it at a random moment, reopens the store
//! and checks that the read model holds each event at or below the
//! checkpoint exactly once and nothing above it. Cycles:
//! `ANNALS_PROJECTION_CRASH_CYCLES` (default 3).

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use common::child;

use annals::projection::{ProjectionContext, ProjectionError, SledProjection};
use annals::store::{Durability, EventFilter, ReadDirection, ReadModelBatch, SledStoreConfig};
use annals::{
    EventStore, ExpectedVersion, NewEvent, Position, ProjectionConfig, ProjectionHandle,
    RecordedEvent, SledStore, StreamId,
};

const CHILD_ENV: &str = "ANNALS_PROJECTION_CRASH_CHILD";
const NAME: &str = "crash-model";
const COUNTS: &str = "rm-counts";
const APPLIED: &str = "rm-applied";
const DOUBLES: &str = "rm-doubles";

/// Counts events per stream and marks each event id once; an event id seen
/// twice is written to `DOUBLES` instead of failing, so that the parent can
/// see it.
struct CountingModel;

impl SledProjection for CountingModel {
    fn trees(&self) -> Vec<String> {
        vec![COUNTS.into(), APPLIED.into(), DOUBLES.into()]
    }

    fn handle(
        &mut self,
        event: &RecordedEvent,
        batch: &mut ReadModelBatch,
        context: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        let id = event.event_id;
        let position = context.position().0;
        if batch.contains_key(APPLIED, &id)? {
            batch.put(DOUBLES, &id, &position)?;
            return Ok(());
        }
        batch.put(APPLIED, &id, &position)?;
        batch.update::<u64>(COUNTS, event.stream_id.as_str(), |count| count + 1)?;
        Ok(())
    }
}

fn open(path: &Path) -> Arc<SledStore> {
    // Flush durability survives kill -9 (the page cache survives the
    // process); the fsync is not what this test is about.
    Arc::new(
        SledStore::open_with(SledStoreConfig::new(path).durability(Durability::Flush))
            .expect("open store"),
    )
}

fn config() -> ProjectionConfig {
    ProjectionConfig::builder(NAME)
        .checkpoint_every(64, Duration::from_millis(20))
        .batch_size(32)
        .build()
        .unwrap()
}

/// The child: appends from a few tasks and runs the projection until killed.
fn child(path: &Path) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = open(path);
        let projection = ProjectionHandle::spawn_sled(Arc::clone(&store), config(), CountingModel)
            .await
            .expect("spawn projection");
        let mut writers = Vec::new();
        for writer in 0..3 {
            let store = Arc::clone(&store);
            writers.push(tokio::spawn(async move {
                let mut i = 0u64;
                loop {
                    let stream = StreamId::new(format!("order-{}", (writer * 7 + i) % 11)).unwrap();
                    let events = (0..1 + i % 3)
                        .map(|_| NewEvent::new("Happened", Vec::new()))
                        .collect();
                    store
                        .append(&stream, ExpectedVersion::Any, events)
                        .await
                        .expect("append");
                    i += 1;
                }
            }));
        }
        println!("child running");
        let _keep = projection;
        for writer in writers {
            writer.await.unwrap();
        }
    });
}

/// What the read model should hold at checkpoint `checkpoint`, read from
/// the log.
async fn check_read_model(store: &SledStore, checkpoint: Position) {
    let events = store
        .read_all(
            Position(1),
            ReadDirection::Forward,
            usize::MAX,
            &EventFilter::All,
        )
        .await
        .unwrap();
    let doubles = store.read_model::<Uuid, u64>(DOUBLES).unwrap();
    assert!(
        doubles.is_empty().unwrap(),
        "{} events were applied twice",
        doubles.len().unwrap()
    );
    let applied: BTreeSet<u64> = store
        .read_model::<Uuid, u64>(APPLIED)
        .unwrap()
        .iter()
        .unwrap()
        .into_iter()
        .map(|(_, position)| position)
        .collect();
    let expected: BTreeSet<u64> = (1..=checkpoint.0).collect();
    assert_eq!(
        applied.len() as u64,
        checkpoint.0,
        "the read model must hold exactly the events up to checkpoint {checkpoint}"
    );
    assert_eq!(applied, expected);

    let mut expected_counts: BTreeMap<String, u64> = BTreeMap::new();
    for event in events.iter().filter(|e| e.position <= checkpoint) {
        *expected_counts
            .entry(event.stream_id.to_string())
            .or_default() += 1;
    }
    let counts: BTreeMap<String, u64> = store
        .read_model::<String, u64>(COUNTS)
        .unwrap()
        .iter()
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(counts, expected_counts);
}

fn random_below(bound: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    // A multiplicative hash of the clock: random enough for a kill moment.
    (nanos.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) % bound
}

#[test]
fn kill_9_during_sled_projection_never_loses_or_repeats_an_event() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        child(Path::new(&path));
        return;
    }
    let cycles: u32 = crate::common::setting("ANNALS_PROJECTION_CRASH_CYCLES", 3);
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut checkpoints = Vec::new();
    for cycle in 0..cycles {
        let mut child = child::test(
            module_path!(),
            "kill_9_during_sled_projection_never_loses_or_repeats_an_event",
        )
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the child");
        std::thread::sleep(Duration::from_millis(300 + random_below(700)));
        child.kill().expect("SIGKILL the child"); // SIGKILL on Unix
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "the child must have been killed, not exited"
        );

        runtime.block_on(async {
            let store = open(dir.path());
            let checkpoint = store
                .load_checkpoint(NAME)
                .await
                .unwrap()
                .unwrap_or(Position::START);
            let head = store.head_position();
            assert!(
                checkpoint <= head,
                "checkpoint {checkpoint} beyond head {head}"
            );
            // Proof that the child ran (it appends from the start).
            let previous = checkpoints.last().map_or(Position::START, |(_, h)| *h);
            assert!(head > previous, "cycle {cycle}: the child appended nothing");
            check_read_model(&store, checkpoint).await;
            eprintln!("cycle {cycle}: head {head}, checkpoint {checkpoint}");
            checkpoints.push((checkpoint, head));
            store.shutdown().await.unwrap();
        });
    }
    assert!(
        checkpoints
            .last()
            .is_some_and(|(c, _)| *c > Position::START),
        "the projection made no durable progress: {checkpoints:?}"
    );

    // Restarted in-process, it finishes the log exactly once, and shutdown
    // makes the final checkpoint durable.
    runtime.block_on(async {
        let store = open(dir.path());
        let head = store.head_position();
        let projection = ProjectionHandle::spawn_sled(Arc::clone(&store), config(), CountingModel)
            .await
            .unwrap();
        projection
            .wait_for(head, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(projection.shutdown().await.unwrap(), head);
        check_read_model(&store, head).await;
        store.shutdown().await.unwrap();
        // Every clone of the store must be gone for sled to release its lock.
        drop(projection);
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.load_checkpoint(NAME).await.unwrap(), Some(head));
        check_read_model(&store, head).await;
    });
}
