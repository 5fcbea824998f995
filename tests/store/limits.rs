//! The limits of the public API that the store conformance suite does not
//! already cover: metadata key lengths, aggregate ids and oversized or
//! too-many events through the runtime, projection names and settings, and that a
//! refusal writes nothing, not even after the sled store is reopened.
//! Each answer is the documented typed error (docs/design.md, "Limits").

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use annals::projection::{FailurePolicy, ProjectionContext, ProjectionError};
use annals::store::{
    SledStoreConfig, DEFAULT_MAX_EVENT_SIZE, MAX_CHECKPOINT_NAME_LEN, MAX_EVENTS_PER_APPEND,
    MAX_EVENT_TYPE_LEN, MAX_STREAM_ID_LEN,
};
use annals::{
    Aggregate, CommandError, DomainEvent, EventStore, ExpectedVersion, InvalidInput, MemoryStore,
    NewEvent, Position, Projection, ProjectionConfig, ProjectionHandle, QueryError, RecordedEvent,
    Runtime, RuntimeConfig, SledStore, StreamId, Version,
};
use common::whole_log;
use serde::{Deserialize, Serialize};

/// An aggregate that emits what it is told: `count` events of `size`
/// payload bytes each, so that a command can cross the store's limits.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Bulk {
    events: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum BulkEvent {
    Emitted(Vec<u8>),
}

impl DomainEvent for BulkEvent {}

#[derive(Debug)]
struct Emit {
    count: usize,
    size: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Bulk {
    type Command = Emit;
    type Event = BulkEvent;
    type Error = Never;
    const CATEGORY: &'static str = "bulk";

    fn handle(&self, command: &Emit) -> Result<Vec<BulkEvent>, Never> {
        Ok((0..command.count)
            .map(|_| BulkEvent::Emitted(vec![7; command.size]))
            .collect())
    }

    fn apply(&mut self, _: &BulkEvent) {
        self.events += 1;
    }
}

fn stream(id: &str) -> StreamId {
    StreamId::new(id).expect("valid stream id")
}

fn sled_store(path: &std::path::Path, max_event_size: usize) -> SledStore {
    SledStore::open_with(SledStoreConfig::new(path).max_event_size(max_event_size))
        .expect("open sled store")
}

fn expect_invalid<T: std::fmt::Debug, E: std::fmt::Debug>(
    result: Result<T, E>,
    is_expected: impl Fn(&E) -> bool,
) {
    match result {
        Err(error) if is_expected(&error) => {}
        other => panic!("expected the documented typed error, got {other:?}"),
    }
}

#[tokio::test]
async fn metadata_key_lengths() {
    let store = MemoryStore::new();
    let id = stream("meta-1");
    let tagged = |key: &str| {
        let mut event = NewEvent::new("Tagged", b"x".to_vec());
        event.metadata.extra.insert(key.to_owned(), "v".into());
        event
    };
    let too_long = "k".repeat(MAX_EVENT_TYPE_LEN + 1);
    for (key, expected) in [
        (
            "",
            InvalidInput::EmptyName {
                what: "metadata key",
            },
        ),
        (
            too_long.as_str(),
            InvalidInput::NameTooLong {
                what: "metadata key",
                len: MAX_EVENT_TYPE_LEN + 1,
                max: MAX_EVENT_TYPE_LEN,
            },
        ),
    ] {
        let result = store
            .append(&id, ExpectedVersion::Any, vec![tagged(key)])
            .await;
        expect_invalid(
            result,
            |e| matches!(e, annals::store::AppendError::InvalidInput(found) if *found == expected),
        );
    }
    assert_eq!(store.head_position(), Position::START);
    let longest = "k".repeat(MAX_EVENT_TYPE_LEN);
    store
        .append(&id, ExpectedVersion::NoStream, vec![tagged(&longest)])
        .await
        .expect("a key of exactly the maximum is accepted");
    let stored = whole_log(&store).await;
    assert!(stored[0].metadata.extra.contains_key(&longest));
}

/// `bulk-` takes 5 of the stream id's 256 bytes.
const LONGEST_AGGREGATE_ID: usize = MAX_STREAM_ID_LEN - "bulk-".len();

#[tokio::test]
async fn aggregate_ids_through_the_runtime() {
    let store = Arc::new(MemoryStore::new());
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let bulk = runtime.aggregates::<Bulk>();
    let one = || Emit { count: 1, size: 1 };

    let too_long = "i".repeat(LONGEST_AGGREGATE_ID + 1);
    let refused: [(&str, InvalidInput); 4] = [
        (
            "",
            InvalidInput::EmptyName {
                what: "aggregate id",
            },
        ),
        (
            &too_long,
            InvalidInput::NameTooLong {
                what: "stream id",
                len: MAX_STREAM_ID_LEN + 1,
                max: MAX_STREAM_ID_LEN,
            },
        ),
        (
            "a\nb",
            InvalidInput::InvalidCharacter {
                what: "stream id",
                character: '\n',
            },
        ),
        (
            "nul\0",
            InvalidInput::InvalidCharacter {
                what: "stream id",
                character: '\0',
            },
        ),
    ];
    for (id, expected) in &refused {
        expect_invalid(
            bulk.execute(id, one()).await,
            |e| matches!(e, CommandError::InvalidInput(found) if found == expected),
        );
        expect_invalid(
            bulk.state(id).await,
            |e| matches!(e, QueryError::InvalidInput(found) if found == expected),
        );
        expect_invalid(
            bulk.state_at(id, Version(0)).await,
            |e| matches!(e, QueryError::InvalidInput(found) if found == expected),
        );
        assert!(!bulk.is_live(id));
    }
    // Refused before any actor or write.
    assert_eq!(runtime.live_aggregates(), 0);
    assert_eq!(store.head_position(), Position::START);

    // The longest id fits exactly; `$` is reserved only at the start of a
    // stream id, and an aggregate's stream starts with its category.
    let longest = "i".repeat(LONGEST_AGGREGATE_ID);
    for id in [longest.as_str(), "$5", "été-✓"] {
        let executed = bulk.execute(id, one()).await.expect("accepted id");
        assert_eq!(executed.version, Version(1));
        let stream_id = format!("bulk-{id}");
        assert_eq!(
            store.stream_version(&stream(&stream_id)).await.unwrap(),
            Version(1)
        );
    }
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn events_too_large_or_too_many_through_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let max = 2048;
    let store = Arc::new(sled_store(dir.path(), max));
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let bulk = runtime.aggregates::<Bulk>();

    // The size counted is the payload (here the postcard of the bytes: a
    // 2-byte length, then the bytes), the type name and the metadata (two
    // optional ids, 34 bytes, none here but counted).
    let overhead = NewEvent::new("Emitted", vec![0u8; 2]).size();
    let fits = max - overhead;
    expect_invalid(
        bulk.execute(
            "a",
            Emit {
                count: 1,
                size: fits + 1,
            },
        )
        .await,
        |e| {
            matches!(e, CommandError::InvalidInput(InvalidInput::EventTooLarge { size, max: m, setting })
                if *size == max + 1 && *m == max && *setting == "SledStoreConfig::max_event_size")
        },
    );
    expect_invalid(
        bulk.execute(
            "a",
            Emit {
                count: MAX_EVENTS_PER_APPEND + 1,
                size: 0,
            },
        )
        .await,
        |e| {
            matches!(e, CommandError::InvalidInput(InvalidInput::TooManyEvents { count, max: m })
                if *count == MAX_EVENTS_PER_APPEND + 1 && *m == MAX_EVENTS_PER_APPEND)
        },
    );
    assert_eq!(store.head_position(), Position::START);
    // A refusal leaves the actor usable and its state untouched.
    assert_eq!(bulk.state("a").await.unwrap().events, 0);

    let executed = bulk
        .execute(
            "a",
            Emit {
                count: 1,
                size: fits,
            },
        )
        .await
        .expect("an event of exactly the maximum");
    assert_eq!(executed.version, Version(1));
    let executed = bulk
        .execute(
            "a",
            Emit {
                count: MAX_EVENTS_PER_APPEND,
                size: 0,
            },
        )
        .await
        .expect("exactly the maximum of events in one command");
    assert_eq!(executed.version, Version(1 + MAX_EVENTS_PER_APPEND as u64));
    runtime.shutdown().await.unwrap();
}

/// Every kind of refusal against a sled store, then a reopen: the log on
/// disk holds only the accepted events.
#[tokio::test]
async fn refusals_write_nothing_to_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let max = 1024;
    let id = stream("kept-1");
    {
        let store = sled_store(&path, max);
        store
            .append(
                &id,
                ExpectedVersion::NoStream,
                vec![NewEvent::new("Kept", b"1".to_vec())],
            )
            .await
            .unwrap();
        let refusals: Vec<(ExpectedVersion, Vec<NewEvent>)> = vec![
            (ExpectedVersion::Any, Vec::new()),
            (
                ExpectedVersion::Any,
                vec![
                    NewEvent::new("Fine", b"x".to_vec()),
                    NewEvent::new("Big", vec![0; max]),
                ],
            ),
            (
                ExpectedVersion::Any,
                (0..=MAX_EVENTS_PER_APPEND)
                    .map(|_| NewEvent::new("Many", Vec::new()))
                    .collect(),
            ),
            (
                ExpectedVersion::Any,
                vec![
                    NewEvent::new("Fine", b"x".to_vec()),
                    NewEvent::new("", b"x".to_vec()),
                ],
            ),
            (
                ExpectedVersion::NoStream,
                vec![NewEvent::new("Late", b"x".to_vec())],
            ),
            (
                ExpectedVersion::Exact(Version(0)),
                vec![NewEvent::new("Late", b"x".to_vec())],
            ),
            (
                ExpectedVersion::Exact(Version(2)),
                vec![NewEvent::new("Early", b"x".to_vec())],
            ),
            (
                ExpectedVersion::Exact(Version::MAX),
                vec![NewEvent::new("Far", b"x".to_vec())],
            ),
        ];
        for (expected, events) in refusals {
            assert!(store.append(&id, expected, events).await.is_err());
        }
        expect_invalid(
            store
                .append(
                    &stream("fresh-1"),
                    ExpectedVersion::StreamExists,
                    vec![NewEvent::new("Orphan", b"x".to_vec())],
                )
                .await,
            |e| matches!(e, annals::store::AppendError::WrongExpectedVersion { .. }),
        );
        assert!(store
            .save_checkpoint(&"c".repeat(MAX_CHECKPOINT_NAME_LEN + 1), Position(1))
            .await
            .is_err());
        store.shutdown().await.unwrap();
    }
    // sled lets go of its lock a few milliseconds after the last handle.
    let store = loop {
        match SledStore::open(&path) {
            Ok(store) => break store,
            Err(annals::StoreError::InUse { .. }) => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => panic!("reopen: {e}"),
        }
    };
    let log = whole_log(&store).await;
    assert_eq!(log.len(), 1, "only the accepted event: {log:?}");
    assert_eq!(log[0].event_type, "Kept");
    assert_eq!(store.head_position(), Position(1));
    assert_eq!(
        store.stream_version(&stream("fresh-1")).await.unwrap(),
        Version::NONE
    );
    store.shutdown().await.unwrap();
    // Once shut down the store frees its directory: sled opened on it
    // shows the store's own checkpoint tree.
    let raw = sled::open(&path).unwrap();
    assert_eq!(
        raw.open_tree("checkpoints").unwrap().len(),
        0,
        "no checkpoint under a refused name"
    );
}

struct Ignore;

impl Projection for Ignore {
    async fn handle(
        &mut self,
        _: &RecordedEvent,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        Ok(())
    }
}

#[tokio::test]
async fn projection_names_are_checkpoint_names() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let too_long = "p".repeat(MAX_CHECKPOINT_NAME_LEN + 1);
    for (name, expected) in [
        (
            "",
            InvalidInput::EmptyName {
                what: "checkpoint name",
            },
        ),
        (
            too_long.as_str(),
            InvalidInput::NameTooLong {
                what: "checkpoint name",
                len: MAX_CHECKPOINT_NAME_LEN + 1,
                max: MAX_CHECKPOINT_NAME_LEN,
            },
        ),
        (
            "tab\tbed",
            InvalidInput::InvalidCharacter {
                what: "checkpoint name",
                character: '\t',
            },
        ),
    ] {
        assert_eq!(
            ProjectionConfig::builder(name).build().map(|_| ()),
            Err(expected)
        );
    }
    let longest = "p".repeat(MAX_CHECKPOINT_NAME_LEN);
    let handle = ProjectionHandle::spawn(
        Arc::clone(&store),
        ProjectionConfig::builder(longest).build().unwrap(),
        Ignore,
    )
    .await
    .expect("a name of exactly the maximum");
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn projection_settings_below_their_minimum_are_refused() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let config = || ProjectionConfig::builder("settings");
    let no_tries = FailurePolicy::Retry {
        max_attempts: 0,
        backoff: Duration::from_millis(1),
    };
    for (config, what) in [
        (config().batch_size(0), "batch_size"),
        (config().read_page_size(0), "read_page_size"),
        (
            config().checkpoint_every(0, Duration::from_secs(1)),
            "checkpoint_every_events",
        ),
        (config().failure_policy(no_tries), "max_attempts"),
    ] {
        let expected = InvalidInput::TooSmall {
            what,
            value: 0,
            min: 1,
        };
        assert_eq!(config.build().map(|_| ()), Err(expected));
    }
    // The minimums themselves are fine.
    let config = config()
        .batch_size(1)
        .read_page_size(1)
        .checkpoint_every(1, Duration::ZERO)
        .max_recorded_skips(0)
        .build()
        .unwrap();
    assert_eq!((config.batch_size(), config.checkpoint_every().0), (1, 1));
    assert_eq!(config.read_page_size(), 1);
    // A page is never smaller than a batch.
    let wide = ProjectionConfig::builder("wide")
        .batch_size(5000)
        .read_page_size(100)
        .build()
        .unwrap();
    assert_eq!(wide.read_page_size(), 5000);
    let handle = ProjectionHandle::spawn(Arc::clone(&store), config, Ignore)
        .await
        .expect("settings at their minimum");
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn default_event_size_is_the_documented_one() {
    assert_eq!(DEFAULT_MAX_EVENT_SIZE, 1 << 20);
    assert_eq!(MAX_EVENTS_PER_APPEND, 10_000);
    assert_eq!(MAX_STREAM_ID_LEN, 256);
    assert_eq!(MAX_EVENT_TYPE_LEN, 128);
    assert_eq!(MAX_CHECKPOINT_NAME_LEN, 256);
}

/// Store settings below their minimum are a typed error before anything is
/// created on disk, not silently raised to the minimum.
#[test]
fn sled_store_settings_below_their_minimum_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let config = || annals::store::SledStoreConfig::new(&path);
    let cases = [
        ("max_event_size", config().max_event_size(0)),
        ("live_feed_capacity", config().live_feed_capacity(0)),
        ("queue_capacity", config().queue_capacity(0)),
        ("max_group_commit", config().max_group_commit(0)),
        (
            "stream_index_flush_events",
            config().stream_index_flush_events(0),
        ),
        (
            "flush_every_ms",
            config().durability(annals::store::Durability::Buffered { flush_every_ms: 0 }),
        ),
    ];
    for (setting, config) in cases {
        match SledStore::open_with(config) {
            Err(annals::StoreError::InvalidInput(InvalidInput::TooSmall { what, value, min })) => {
                assert_eq!((what, value, min), (setting, 0, 1));
            }
            other => panic!("{setting} 0: expected TooSmall, got {other:?}"),
        }
        assert!(
            !path.exists(),
            "{setting} 0: the store directory was created"
        );
    }
}

/// An event size a chunk cannot address (its offsets are 32-bit) is
/// refused before anything is created; 1 GiB itself is accepted.
#[test]
fn a_max_event_size_above_one_gib_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let config = annals::store::SledStoreConfig::new(&path).max_event_size((1 << 30) + 1);
    match SledStore::open_with(config) {
        Err(annals::StoreError::InvalidInput(InvalidInput::TooLarge { what, value, max })) => {
            assert_eq!(
                (what, value, max),
                ("max_event_size", (1 << 30) + 1, 1 << 30)
            );
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(!path.exists(), "the store directory was created");
    let at_limit = annals::store::SledStoreConfig::new(&path).max_event_size(1 << 30);
    assert_eq!(at_limit.validate(), Ok(()));
}
