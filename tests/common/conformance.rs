//! The store conformance suite: every rule of the `EventStore` trait,
//! written once in [`cases`] and run against a backend by
//! `conformance_suite!(module_name, open_fn)`, which writes one
//! `#[tokio::test]` per case, so a failure names the case and the backend.
//! A backend that passes here behaves like the others for every caller.
//!
//! A test binary mounts it at its root beside `common`:
//! ```ignore
//! mod common;
//! #[macro_use]
//! #[path = "common/conformance.rs"]
//! mod conformance;
//! use conformance::{Backend, Limits, Opening};
//!
//! fn my_store(limits: Limits) -> Opening {
//!     Box::pin(async move { Backend::new(MyStore::open(limits).await, None) })
//! }
//! conformance_suite!(my_store_conformance, crate::my_store);
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use annals::store::{
    AppendError, AppendResult, Commit, EventFilter, FeedError, LiveFeed, Metadata, ReadDirection,
    ReadError, Snapshot, DEFAULT_LIVE_FEED_CAPACITY, DEFAULT_MAX_EVENT_SIZE,
    MAX_CHECKPOINT_NAME_LEN, MAX_EVENTS_PER_APPEND, MAX_EVENT_TYPE_LEN, MAX_STREAM_ID_LEN,
};
use annals::{
    EventStore, ExpectedVersion, InvalidInput, NewEvent, Position, RecordedEvent, StoreError,
    StreamId, Version,
};
use uuid::Uuid;

use crate::common::{whole_log, whole_stream};

/// The limits a case needs from the store it runs against.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// The largest event the store must accept; one byte more is refused.
    pub(crate) max_event_size: usize,
    /// Commits the live feed keeps for a slow subscriber.
    pub(crate) live_feed_capacity: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_size: DEFAULT_MAX_EVENT_SIZE,
            live_feed_capacity: DEFAULT_LIVE_FEED_CAPACITY,
        }
    }
}

/// A store under test and whatever must outlive it (its directory, its
/// database schema, ...). Fields drop in order: the store first.
pub(crate) struct Backend {
    pub(crate) store: Box<dyn EventStore>,
    pub(crate) keep: Option<Box<dyn Send>>,
}

impl Backend {
    /// `store`, keeping `keep` alive until after it is dropped.
    pub(crate) fn new(store: impl EventStore, keep: Option<Box<dyn Send>>) -> Self {
        Self {
            store: Box::new(store),
            keep,
        }
    }
}

/// A fresh, empty store of one backend, on its way.
pub(crate) type Opening = Pin<Box<dyn Future<Output = Backend>>>;

/// Opens a fresh, empty store of one backend with these limits.
pub(crate) type Open = fn(Limits) -> Opening;

/// One `#[tokio::test]` per case in `mod $module`, each on a fresh store
/// from `$open` (a path to an [`Open`] fn).
#[allow(unused_macros)]
macro_rules! conformance_suite {
    ($module:ident, $open:path) => {
        conformance_suite!($module, $open, skip_if = crate::conformance::never);
    };
    ($module:ident, $open:path, skip_if = $skip:path) => {
        conformance_suite!(@cases $module, $open, $skip;
            expected_any,
            expected_no_stream,
            expected_stream_exists,
            expected_exact,
            multi_event_append_is_atomic_and_contiguous,
            idempotent_retry_returns_original_result,
            read_event_finds_committed_events_by_id,
            partial_overlap_is_a_duplicate,
            id_on_another_stream_is_a_duplicate,
            reordered_retry_is_a_duplicate,
            retries_are_recognised_whatever_the_order_of_ids,
            duplicate_id_within_one_append_is_invalid,
            stream_id_limits,
            empty_append_is_invalid,
            event_size_limit,
            default_event_size_limit,
            events_per_append_limit,
            event_type_and_metadata_key_limits,
            zero_read_limit_is_invalid,
            checkpoint_name_limits,
            read_stream_forward,
            read_stream_backward,
            stream_version_without_reading,
            read_all_forward_and_backward,
            read_all_filters,
            snapshots,
            a_stream_filter_pages_like_the_whole_log_filtered,
            a_snapshot_never_replaces_a_newer_one,
            snapshots_are_refused_after_shutdown,
            checkpoints,
            checkpoints_are_refused_after_shutdown,
            live_feed_delivers_commits_in_position_order,
            lagging_subscriber_never_blocks_appends,
            metadata_round_trips,
            shutdown_refuses_appends,
            shutdown_closes_the_live_feed,
        );
    };
    (@cases $module:ident, $open:path, $skip:path; $($case:ident,)*) => {
        mod $module {
            $(
                #[tokio::test]
                async fn $case() {
                    if $skip() {
                        return;
                    }
                    crate::conformance::cases::$case($open).await;
                }
            )*
        }
    };
}

/// The default of `skip_if`: a backend that is always there.
pub(crate) fn never() -> bool {
    false
}

// ---------------------------------------------------------------------------
// Helpers shared by the cases.

fn stream(id: &str) -> StreamId {
    StreamId::new(id).expect("valid stream id")
}

fn event(event_type: &str, payload: &str) -> NewEvent {
    NewEvent::new(event_type, payload.as_bytes().to_vec())
}

/// `count` events whose payloads say which append and which event they are.
fn events(tag: &str, count: usize) -> Vec<NewEvent> {
    (0..count)
        .map(|i| event("Happened", &format!("{tag}/{i}")))
        .collect()
}

async fn append(
    store: &dyn EventStore,
    id: &StreamId,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> AppendResult {
    store
        .append(id, expected, events)
        .await
        .unwrap_or_else(|e| panic!("append to {id} with {expected:?} failed: {e}"))
}

/// Everything a failed call must leave untouched.
#[derive(Debug, PartialEq)]
struct Observed {
    log: Vec<RecordedEvent>,
    head: Position,
}

async fn observe(store: &dyn EventStore) -> Observed {
    Observed {
        log: whole_log(store).await,
        head: store.head_position(),
    }
}

fn assert_conflict(
    result: Result<AppendResult, AppendError>,
    id: &StreamId,
    expected: ExpectedVersion,
    actual: Version,
) {
    match result {
        Err(error @ AppendError::WrongExpectedVersion { .. }) => {
            let message = error.to_string();
            let AppendError::WrongExpectedVersion {
                stream: found_stream,
                expected: found_expected,
                actual: found_actual,
            } = error
            else {
                unreachable!()
            };
            assert_eq!(
                (&found_stream, found_expected, found_actual),
                (id, expected, actual)
            );
            // A person reading the log must see both versions too.
            assert!(
                message.contains(&format!("{expected:?}"))
                    && message.contains(&format!("actual {actual}")),
                "conflict message does not name both versions: {message}"
            );
        }
        other => panic!("expected a conflict on {id} ({expected:?} vs {actual}), got {other:?}"),
    }
}

fn assert_duplicate(result: Result<AppendResult, AppendError>, id: Uuid) {
    match result {
        Err(AppendError::DuplicateEventId { event_id, .. }) => assert_eq!(event_id, id),
        other => panic!("expected DuplicateEventId({id}), got {other:?}"),
    }
}

fn assert_invalid(result: Result<AppendResult, AppendError>, expected: InvalidInput) {
    match result {
        Err(AppendError::InvalidInput(found)) => assert_eq!(found, expected),
        other => panic!("expected InvalidInput({expected:?}), got {other:?}"),
    }
}

/// `EventTooLarge` of this size and maximum, naming a setting (which one
/// depends on the backend) in its message.
fn assert_too_large(result: Result<AppendResult, AppendError>, size: usize, max: usize) {
    match result {
        Err(AppendError::InvalidInput(
            error @ InvalidInput::EventTooLarge {
                size: found_size,
                max: found_max,
                setting,
            },
        )) => {
            assert_eq!((found_size, found_max), (size, max));
            assert!(!setting.is_empty(), "EventTooLarge names no setting");
            assert!(
                error.to_string().contains(setting),
                "the message does not name the setting {setting:?}: {error}"
            );
        }
        other => panic!("expected EventTooLarge {{ size: {size}, max: {max} }}, got {other:?}"),
    }
}

fn positions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.position.0).collect()
}

fn versions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.version.0).collect()
}

async fn next_commit(feed: &mut LiveFeed) -> Result<Commit, FeedError> {
    tokio::time::timeout(Duration::from_secs(5), feed.recv())
        .await
        .expect("the live feed delivered nothing within 5 s")
}

// ---------------------------------------------------------------------------
// The cases. Each takes the backend's `Open` and starts from an empty store.

pub(crate) mod cases {
    use super::*;

    pub(crate) async fn expected_any(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("any-1");

        let first = append(store, &id, ExpectedVersion::Any, events("a", 1)).await;
        assert_eq!(
            first,
            AppendResult {
                first_version: Version(1),
                last_version: Version(1),
                first_position: Position(1),
                last_position: Position(1),
            }
        );
        let second = append(store, &id, ExpectedVersion::Any, events("b", 2)).await;
        assert_eq!(
            (second.first_version, second.last_version),
            (Version(2), Version(3))
        );
        assert_eq!(
            (second.first_position, second.last_position),
            (Position(2), Position(3))
        );
        assert_eq!(versions(&whole_stream(store, &id).await), [1, 2, 3]);
    }

    pub(crate) async fn expected_no_stream(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("new-1");

        let first = append(store, &id, ExpectedVersion::NoStream, events("a", 2)).await;
        assert_eq!(
            (first.first_version, first.last_version),
            (Version(1), Version(2))
        );

        let before = observe(store).await;
        let again = store
            .append(&id, ExpectedVersion::NoStream, events("b", 3))
            .await;
        assert_conflict(again, &id, ExpectedVersion::NoStream, Version(2));
        assert_eq!(observe(store).await, before, "a conflict wrote something");

        // Another stream is still new.
        let other = append(
            store,
            &stream("new-2"),
            ExpectedVersion::NoStream,
            events("c", 1),
        )
        .await;
        assert_eq!(other.first_version, Version(1));
        assert_eq!(other.first_position, Position(3));
    }

    pub(crate) async fn expected_stream_exists(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("exists-1");

        let before = observe(store).await;
        let missing = store
            .append(&id, ExpectedVersion::StreamExists, events("a", 2))
            .await;
        assert_conflict(missing, &id, ExpectedVersion::StreamExists, Version::NONE);
        assert_eq!(observe(store).await, before, "a conflict wrote something");
        assert_eq!(store.stream_version(&id).await.unwrap(), Version::NONE);

        append(store, &id, ExpectedVersion::NoStream, events("b", 1)).await;
        let next = append(store, &id, ExpectedVersion::StreamExists, events("c", 2)).await;
        assert_eq!(
            (next.first_version, next.last_version),
            (Version(2), Version(3))
        );
    }

    pub(crate) async fn expected_exact(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("exact-1");

        // Exact(0) is NoStream.
        let first = append(
            store,
            &id,
            ExpectedVersion::Exact(Version::NONE),
            events("a", 2),
        )
        .await;
        assert_eq!(first.last_version, Version(2));

        for wrong in [0, 1, 3, 100] {
            let before = observe(store).await;
            let expected = ExpectedVersion::Exact(Version(wrong));
            let result = store.append(&id, expected, events("wrong", 3)).await;
            assert_conflict(result, &id, expected, Version(2));
            assert_eq!(observe(store).await, before, "a conflict wrote something");
        }

        let right = append(
            store,
            &id,
            ExpectedVersion::Exact(Version(2)),
            events("b", 1),
        )
        .await;
        assert_eq!(
            right,
            AppendResult {
                first_version: Version(3),
                last_version: Version(3),
                first_position: Position(3),
                last_position: Position(3),
            }
        );
        // Exact(n) on a stream that does not exist fails with actual 0.
        let ghost = stream("exact-2");
        let result = store
            .append(&ghost, ExpectedVersion::Exact(Version(3)), events("c", 1))
            .await;
        assert_conflict(
            result,
            &ghost,
            ExpectedVersion::Exact(Version(3)),
            Version::NONE,
        );
        assert_eq!(versions(&whole_stream(store, &id).await), [1, 2, 3]);
    }

    pub(crate) async fn multi_event_append_is_atomic_and_contiguous(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let a = stream("multi-a");
        let b = stream("multi-b");

        let first = append(store, &a, ExpectedVersion::NoStream, events("a1", 3)).await;
        let second = append(store, &b, ExpectedVersion::NoStream, events("b1", 4)).await;
        let third = append(
            store,
            &a,
            ExpectedVersion::Exact(Version(3)),
            events("a2", 2),
        )
        .await;
        assert_eq!(
            [first, second, third].map(|r| (
                r.first_version.0,
                r.last_version.0,
                r.first_position.0,
                r.last_position.0
            )),
            [(1, 3, 1, 3), (1, 4, 4, 7), (4, 5, 8, 9)]
        );

        let log = whole_log(store).await;
        assert_eq!(positions(&log), (1..=9).collect::<Vec<_>>());
        let payloads: Vec<String> = log
            .iter()
            .map(|e| String::from_utf8(e.payload.clone()).unwrap())
            .collect();
        assert_eq!(
            payloads,
            ["a1/0", "a1/1", "a1/2", "b1/0", "b1/1", "b1/2", "b1/3", "a2/0", "a2/1"]
        );
        let stream_a = whole_stream(store, &a).await;
        assert_eq!(versions(&stream_a), [1, 2, 3, 4, 5]);
        assert_eq!(positions(&stream_a), [1, 2, 3, 8, 9]);

        // A refused multi-event append writes none of its events, whatever
        // the reason: a conflict, or one bad event among good ones.
        let before = observe(store).await;
        let conflict = store
            .append(&a, ExpectedVersion::Exact(Version(3)), events("late", 5))
            .await;
        assert_conflict(conflict, &a, ExpectedVersion::Exact(Version(3)), Version(5));
        let mut one_bad = events("bad", 3);
        one_bad[2].event_type = String::new();
        let result = store.append(&a, ExpectedVersion::Any, one_bad).await;
        assert_invalid(result, InvalidInput::EmptyName { what: "event type" });
        assert_eq!(
            observe(store).await,
            before,
            "a refused append wrote something"
        );
    }

    pub(crate) async fn read_event_finds_committed_events_by_id(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("by-id-1");
        let other = stream("by-id-2");
        append(store, &other, ExpectedVersion::Any, events("other", 2)).await;
        let request = events("mine", 3);
        let wanted = request[1].event_id;
        append(store, &id, ExpectedVersion::NoStream, request).await;
        append(store, &other, ExpectedVersion::Any, events("later", 1)).await;
        let found = store
            .read_event(wanted)
            .await
            .expect("read_event")
            .expect("a committed event is found by its id");
        let in_log = whole_stream(store, &id).await;
        assert_eq!(found, in_log[1], "the same record as a stream read gives");
        assert_eq!((found.version, found.position), (Version(2), Position(4)));
        assert_eq!(
            store.read_event(Uuid::now_v7()).await.expect("read_event"),
            None
        );
    }

    pub(crate) async fn idempotent_retry_returns_original_result(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("retry-1");
        append(store, &id, ExpectedVersion::NoStream, events("before", 1)).await;

        let request = events("request", 3);
        let original = append(
            store,
            &id,
            ExpectedVersion::Exact(Version(1)),
            request.clone(),
        )
        .await;
        assert_eq!(
            (original.first_version, original.last_version),
            (Version(2), Version(4))
        );

        // The same request again, as after a timeout: the original answer,
        // even though its expected version is now stale, and nothing written.
        let before = observe(store).await;
        let retried = append(
            store,
            &id,
            ExpectedVersion::Exact(Version(1)),
            request.clone(),
        )
        .await;
        assert_eq!(retried, original);
        assert_eq!(observe(store).await, before, "a retry wrote something");

        // Still a retry after the stream moved on, with any expectation.
        append(store, &id, ExpectedVersion::Any, events("after", 2)).await;
        let before = observe(store).await;
        for expected in [
            ExpectedVersion::Any,
            ExpectedVersion::NoStream,
            ExpectedVersion::StreamExists,
            ExpectedVersion::Exact(Version(1)),
        ] {
            let retried = append(store, &id, expected, request.clone()).await;
            assert_eq!(retried, original, "retry with {expected:?}");
        }
        assert_eq!(observe(store).await, before, "a retry wrote something");
        assert_eq!(store.stream_version(&id).await.unwrap(), Version(6));
    }

    pub(crate) async fn partial_overlap_is_a_duplicate(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("partial-1");
        let request = events("request", 2);
        append(store, &id, ExpectedVersion::NoStream, request.clone()).await;
        let before = observe(store).await;

        // Stored ids followed by a new one.
        let fresh = event("Happened", "fresh");
        let mut extended = request.clone();
        extended.push(fresh.clone());
        assert_duplicate(
            store.append(&id, ExpectedVersion::Any, extended).await,
            request[0].event_id,
        );
        // A new id followed by a stored one.
        let prefixed = vec![fresh.clone(), request[1].clone()];
        assert_duplicate(
            store.append(&id, ExpectedVersion::Any, prefixed).await,
            request[1].event_id,
        );
        assert_eq!(
            observe(store).await,
            before,
            "a partial overlap wrote something"
        );
    }

    pub(crate) async fn id_on_another_stream_is_a_duplicate(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let request = events("request", 2);
        append(
            store,
            &stream("owner-1"),
            ExpectedVersion::NoStream,
            request.clone(),
        )
        .await;
        let before = observe(store).await;

        let thief = stream("owner-2");
        assert_duplicate(
            store
                .append(&thief, ExpectedVersion::Any, request.clone())
                .await,
            request[0].event_id,
        );
        assert_duplicate(
            store
                .append(&thief, ExpectedVersion::Any, vec![request[1].clone()])
                .await,
            request[1].event_id,
        );
        assert_eq!(observe(store).await, before, "a stolen id wrote something");
        assert_eq!(store.stream_version(&thief).await.unwrap(), Version::NONE);
    }

    pub(crate) async fn reordered_retry_is_a_duplicate(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("order-of-ids");
        let request = events("request", 2);
        append(store, &id, ExpectedVersion::NoStream, request.clone()).await;
        let before = observe(store).await;

        let reordered = vec![request[1].clone(), request[0].clone()];
        assert_duplicate(
            store.append(&id, ExpectedVersion::Any, reordered).await,
            request[0].event_id,
        );
        assert_eq!(
            observe(store).await,
            before,
            "a reordered retry wrote something"
        );
    }

    /// Ids need not grow: the sled store skips the id index for an id above
    /// every stored one, which must never hide a stored id below it.
    pub(crate) async fn retries_are_recognised_whatever_the_order_of_ids(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("ids-in-any-order");
        let with_id = |n: u128, tag: &str| events(tag, 1).remove(0).with_id(Uuid::from_u128(n));
        let high = vec![with_id(u128::MAX - 1, "high")];
        let low = vec![with_id(1, "low")];
        let fresh = events("fresh", 1);
        let mut results = Vec::new();
        for request in [&high, &low, &fresh] {
            results.push(append(store, &id, ExpectedVersion::Any, request.clone()).await);
        }
        let before = observe(store).await;
        for (request, original) in [&high, &low, &fresh].into_iter().zip(&results) {
            let retried = append(store, &id, ExpectedVersion::Any, request.clone()).await;
            assert_eq!(&retried, original);
        }
        assert_eq!(observe(store).await, before, "a retry wrote something");
        // Above the greatest stored id: new, and stored.
        let top = vec![with_id(u128::MAX, "top")];
        let stored = append(store, &id, ExpectedVersion::Any, top.clone()).await;
        assert_eq!(stored.last_version, Version(4));
        assert_eq!(append(store, &id, ExpectedVersion::Any, top).await, stored);
    }

    pub(crate) async fn duplicate_id_within_one_append_is_invalid(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("twice-1");
        let first = event("Happened", "one");
        let twin = event("Happened", "two").with_id(first.event_id);

        let result = store
            .append(&id, ExpectedVersion::Any, vec![first.clone(), twin])
            .await;
        assert_invalid(
            result,
            InvalidInput::DuplicateEventIdInAppend(first.event_id),
        );
        assert_eq!(observe(store).await.log, Vec::new());
        assert_eq!(store.head_position(), Position::START);
    }

    pub(crate) async fn stream_id_limits(open: Open) {
        assert_eq!(
            StreamId::new("").unwrap_err(),
            InvalidInput::EmptyName { what: "stream id" }
        );
        assert_eq!(
            StreamId::new("x".repeat(MAX_STREAM_ID_LEN + 1)).unwrap_err(),
            InvalidInput::NameTooLong {
                what: "stream id",
                len: MAX_STREAM_ID_LEN + 1,
                max: MAX_STREAM_ID_LEN,
            }
        );
        for (id, character) in [
            ("a\0b", '\0'),
            ("line\nbreak", '\n'),
            ("del\u{7f}", '\u{7f}'),
        ] {
            assert_eq!(
                StreamId::new(id).unwrap_err(),
                InvalidInput::InvalidCharacter {
                    what: "stream id",
                    character,
                }
            );
        }
        assert_eq!(
            StreamId::new("$all").unwrap_err(),
            InvalidInput::ReservedStreamId("$all".into())
        );
        assert!(
            StreamId::try_from("order-$1").is_ok(),
            "'$' is reserved only first"
        );

        // The longest id, and non-ASCII ids, are stored and read back whole.
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let longest = stream(&"x".repeat(MAX_STREAM_ID_LEN));
        let unicode = stream("commande-été-✓");
        append(
            store,
            &longest,
            ExpectedVersion::NoStream,
            events("long", 2),
        )
        .await;
        append(store, &unicode, ExpectedVersion::NoStream, events("uni", 1)).await;
        let read = whole_stream(store, &longest).await;
        assert_eq!(versions(&read), [1, 2]);
        assert!(read.iter().all(|e| e.stream_id == longest));
        assert_eq!(whole_stream(store, &unicode).await[0].stream_id, unicode);
        assert_eq!(unicode.category(), "commande");
    }

    pub(crate) async fn empty_append_is_invalid(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("empty-1");
        for expected in [ExpectedVersion::Any, ExpectedVersion::NoStream] {
            let result = store.append(&id, expected, Vec::new()).await;
            assert_invalid(result, InvalidInput::EmptyAppend);
        }
        assert_eq!(store.stream_version(&id).await.unwrap(), Version::NONE);
        assert_eq!(store.head_position(), Position::START);
    }

    /// An event of exactly `size` bytes as the store counts them, with
    /// metadata so that they are counted too.
    fn event_of_size(size: usize) -> NewEvent {
        let mut metadata = Metadata::new(Some(Uuid::now_v7()), None);
        metadata.extra.insert("tenant".into(), "acme".into());
        let empty = NewEvent::new("Sized", Vec::new()).with_metadata(metadata);
        let payload_len = size
            .checked_sub(empty.size())
            .expect("size smaller than an empty event");
        let mut sized = empty;
        sized.payload = vec![0xA5; payload_len];
        assert_eq!(sized.size(), size);
        sized
    }

    pub(crate) async fn event_size_limit(open: Open) {
        let max = 4096;
        let backend = open(Limits {
            max_event_size: max,
            ..Limits::default()
        })
        .await;
        let store = &*backend.store;
        let id = stream("sized-1");

        let too_large = vec![event("Small", "ok"), event_of_size(max + 1)];
        let result = store.append(&id, ExpectedVersion::Any, too_large).await;
        assert_too_large(result, max + 1, max);
        assert_eq!(store.head_position(), Position::START);

        // Metadata count: a small payload with large tags is refused too.
        let mut tagged = event("Small", "ok");
        tagged.metadata.extra.insert("note".into(), "n".repeat(max));
        let size = tagged.size();
        assert!(size > max);
        let result = store.append(&id, ExpectedVersion::Any, vec![tagged]).await;
        assert_too_large(result, size, max);

        let at_max = event_of_size(max);
        append(store, &id, ExpectedVersion::NoStream, vec![at_max.clone()]).await;
        let stored = whole_stream(store, &id).await;
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].payload, at_max.payload);
        assert_eq!(stored[0].metadata, at_max.metadata);
    }

    pub(crate) async fn default_event_size_limit(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("sized-default");
        let max = DEFAULT_MAX_EVENT_SIZE;

        let result = store
            .append(&id, ExpectedVersion::Any, vec![event_of_size(max + 1)])
            .await;
        assert_too_large(result, max + 1, max);
        let at_max = event_of_size(max);
        append(store, &id, ExpectedVersion::NoStream, vec![at_max.clone()]).await;
        assert_eq!(whole_stream(store, &id).await[0].payload, at_max.payload);
    }

    pub(crate) async fn events_per_append_limit(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("many-1");

        let result = store
            .append(
                &id,
                ExpectedVersion::Any,
                events("over", MAX_EVENTS_PER_APPEND + 1),
            )
            .await;
        assert_invalid(
            result,
            InvalidInput::TooManyEvents {
                count: MAX_EVENTS_PER_APPEND + 1,
                max: MAX_EVENTS_PER_APPEND,
            },
        );
        assert_eq!(store.head_position(), Position::START);

        let max = MAX_EVENTS_PER_APPEND as u64;
        let result = append(
            store,
            &id,
            ExpectedVersion::NoStream,
            events("max", MAX_EVENTS_PER_APPEND),
        )
        .await;
        assert_eq!(
            (result.last_version, result.last_position),
            (Version(max), Position(max))
        );
        let stored = whole_stream(store, &id).await;
        assert_eq!(versions(&stored), (1..=max).collect::<Vec<_>>());
    }

    pub(crate) async fn event_type_and_metadata_key_limits(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("names-1");

        let cases = [
            (
                event("", "x"),
                InvalidInput::EmptyName { what: "event type" },
            ),
            (
                event(&"T".repeat(MAX_EVENT_TYPE_LEN + 1), "x"),
                InvalidInput::NameTooLong {
                    what: "event type",
                    len: MAX_EVENT_TYPE_LEN + 1,
                    max: MAX_EVENT_TYPE_LEN,
                },
            ),
            (
                event("Bad\tType", "x"),
                InvalidInput::InvalidCharacter {
                    what: "event type",
                    character: '\t',
                },
            ),
            (
                {
                    let mut e = event("Tagged", "x");
                    e.metadata.extra.insert("key\0".into(), "v".into());
                    e
                },
                InvalidInput::InvalidCharacter {
                    what: "metadata key",
                    character: '\0',
                },
            ),
        ];
        for (bad, expected) in cases {
            let result = store.append(&id, ExpectedVersion::Any, vec![bad]).await;
            assert_invalid(result, expected);
        }
        assert_eq!(store.head_position(), Position::START);

        let longest = event(&"T".repeat(MAX_EVENT_TYPE_LEN), "x");
        append(store, &id, ExpectedVersion::NoStream, vec![longest]).await;
        assert_eq!(
            whole_stream(store, &id).await[0].event_type.len(),
            MAX_EVENT_TYPE_LEN
        );
    }

    pub(crate) async fn zero_read_limit_is_invalid(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("limit-1");
        append(store, &id, ExpectedVersion::Any, events("a", 2)).await;

        for direction in [ReadDirection::Forward, ReadDirection::Backward] {
            let from = match direction {
                ReadDirection::Forward => Version::FIRST,
                ReadDirection::Backward => Version::MAX,
            };
            assert!(matches!(
                store.read_stream(&id, from, direction, 0).await,
                Err(ReadError::InvalidInput(InvalidInput::ZeroLimit))
            ));
            assert!(matches!(
                store
                    .read_all(Position::START, direction, 0, &EventFilter::All)
                    .await,
                Err(ReadError::InvalidInput(InvalidInput::ZeroLimit))
            ));
        }
        // Limit 1 reads exactly one.
        let one = store
            .read_stream(&id, Version::FIRST, ReadDirection::Forward, 1)
            .await
            .unwrap();
        assert_eq!(versions(&one), [1]);
    }

    pub(crate) async fn checkpoint_name_limits(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let too_long = "c".repeat(MAX_CHECKPOINT_NAME_LEN + 1);
        let cases = [
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
                "proj\u{1b}ection",
                InvalidInput::InvalidCharacter {
                    what: "checkpoint name",
                    character: '\u{1b}',
                },
            ),
        ];
        for (name, expected) in cases {
            match store.save_checkpoint(name, Position(1)).await {
                Err(StoreError::InvalidInput(found)) => assert_eq!(found, expected),
                other => panic!("save_checkpoint({name:?}): expected {expected:?}, got {other:?}"),
            }
            match store.load_checkpoint(name).await {
                Err(ReadError::InvalidInput(found)) => assert_eq!(found, expected),
                other => panic!("load_checkpoint({name:?}): expected {expected:?}, got {other:?}"),
            }
        }
        let longest = "c".repeat(MAX_CHECKPOINT_NAME_LEN);
        store.save_checkpoint(&longest, Position(9)).await.unwrap();
        assert_eq!(
            store.load_checkpoint(&longest).await.unwrap(),
            Some(Position(9))
        );
    }

    /// `acct-1` gets versions 1..=10, interleaved with `acct-10` and `acct-1x`
    /// whose ids start with `acct-1`, so that a read that strays past its
    /// stream's keys shows.
    async fn interleaved_streams(store: &dyn EventStore) -> StreamId {
        let id = stream("acct-1");
        for (round, count) in [3usize, 1, 4, 2].into_iter().enumerate() {
            append(
                store,
                &stream("acct-10"),
                ExpectedVersion::Any,
                events("ten", 2),
            )
            .await;
            append(
                store,
                &id,
                ExpectedVersion::Any,
                events(&format!("one{round}"), count),
            )
            .await;
            append(
                store,
                &stream("acct-1x"),
                ExpectedVersion::Any,
                events("x", 1),
            )
            .await;
        }
        id
    }

    pub(crate) async fn read_stream_forward(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = interleaved_streams(store).await;
        let read = |from: u64, limit: usize| {
            let id = id.clone();
            async move {
                store
                    .read_stream(&id, Version(from), ReadDirection::Forward, limit)
                    .await
                    .unwrap()
            }
        };

        let all = read(1, 100).await;
        assert_eq!(versions(&all), (1..=10).collect::<Vec<_>>());
        assert!(all.iter().all(|e| e.stream_id == id));
        // Positions increase with versions, with the other streams between.
        assert!(all.windows(2).all(|w| w[0].position < w[1].position));
        assert_eq!(versions(&read(0, 100).await), (1..=10).collect::<Vec<_>>());
        assert_eq!(versions(&read(4, 3).await), [4, 5, 6]);
        assert_eq!(versions(&read(9, 5).await), [9, 10]);
        assert_eq!(versions(&read(10, 1).await), [10]);
        assert!(read(11, 10).await.is_empty());
        // Each event is the same as in $all.
        let log = whole_log(store).await;
        for event in &all {
            assert_eq!(&log[event.position.0 as usize - 1], event);
        }
        assert!(store
            .read_stream(
                &stream("acct-2"),
                Version::FIRST,
                ReadDirection::Forward,
                10
            )
            .await
            .unwrap()
            .is_empty());
    }

    pub(crate) async fn read_stream_backward(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = interleaved_streams(store).await;
        let read = |from: Version, limit: usize| {
            let id = id.clone();
            async move {
                store
                    .read_stream(&id, from, ReadDirection::Backward, limit)
                    .await
                    .unwrap()
            }
        };

        let all = read(Version::MAX, 100).await;
        assert_eq!(versions(&all), (1..=10).rev().collect::<Vec<_>>());
        assert!(all.iter().all(|e| e.stream_id == id));
        assert_eq!(versions(&read(Version::MAX, 3).await), [10, 9, 8]);
        assert_eq!(versions(&read(Version(10), 2).await), [10, 9]);
        assert_eq!(versions(&read(Version(5), 2).await), [5, 4]);
        assert_eq!(versions(&read(Version(2), 10).await), [2, 1]);
        assert_eq!(versions(&read(Version(50), 1).await), [10]);
        assert!(read(Version::NONE, 10).await.is_empty());
        let ten = store
            .read_stream(
                &stream("acct-10"),
                Version::MAX,
                ReadDirection::Backward,
                100,
            )
            .await
            .unwrap();
        assert_eq!(versions(&ten), (1..=8).rev().collect::<Vec<_>>());
    }

    pub(crate) async fn stream_version_without_reading(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = interleaved_streams(store).await;
        assert_eq!(store.stream_version(&id).await.unwrap(), Version(10));
        assert_eq!(
            store.stream_version(&stream("acct-10")).await.unwrap(),
            Version(8)
        );
        assert_eq!(
            store.stream_version(&stream("acct-1x")).await.unwrap(),
            Version(4)
        );
        assert_eq!(
            store.stream_version(&stream("acct")).await.unwrap(),
            Version::NONE
        );
        append(
            store,
            &id,
            ExpectedVersion::Exact(Version(10)),
            events("more", 3),
        )
        .await;
        assert_eq!(store.stream_version(&id).await.unwrap(), Version(13));
    }

    /// The log the `$all` cases read, positions 1..=9:
    /// 1 order-1 OrderPlaced, 2 customer-1 CustomerRegistered,
    /// 3 order-2 OrderPlaced, 4 order-1 OrderShipped, 5 orderline-1 LineAdded,
    /// 6 order OrderPlaced, 7 customer-1 CustomerMoved,
    /// 8 order-2 OrderShipped, 9 order-2 OrderDelivered.
    async fn mixed_log(store: &dyn EventStore) -> Vec<RecordedEvent> {
        let appends: [(&str, &[&str]); 8] = [
            ("order-1", &["OrderPlaced"]),
            ("customer-1", &["CustomerRegistered"]),
            ("order-2", &["OrderPlaced"]),
            ("order-1", &["OrderShipped"]),
            ("orderline-1", &["LineAdded"]),
            ("order", &["OrderPlaced"]),
            ("customer-1", &["CustomerMoved"]),
            ("order-2", &["OrderShipped", "OrderDelivered"]),
        ];
        for (id, types) in appends {
            let batch = types.iter().map(|t| event(t, id)).collect();
            append(store, &stream(id), ExpectedVersion::Any, batch).await;
        }
        let log = whole_log(store).await;
        assert_eq!(positions(&log), (1..=9).collect::<Vec<_>>());
        log
    }

    pub(crate) async fn read_all_forward_and_backward(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let log = mixed_log(store).await;
        let all = EventFilter::All;
        let read = |from: Position, direction: ReadDirection, limit: usize| {
            let all = all.clone();
            async move { store.read_all(from, direction, limit, &all).await.unwrap() }
        };
        use ReadDirection::{Backward, Forward};

        assert_eq!(read(Position::START, Forward, 100).await, log);
        assert_eq!(read(Position(1), Forward, 100).await, log);
        assert_eq!(positions(&read(Position(5), Forward, 3).await), [5, 6, 7]);
        assert_eq!(positions(&read(Position(9), Forward, 3).await), [9]);
        assert!(read(Position(10), Forward, 3).await.is_empty());
        assert!(read(Position::END, Forward, 3).await.is_empty());

        let mut reversed = log.clone();
        reversed.reverse();
        assert_eq!(read(Position::END, Backward, 100).await, reversed);
        assert_eq!(read(Position(9), Backward, 100).await, reversed);
        assert_eq!(
            positions(&read(Position::END, Backward, 4).await),
            [9, 8, 7, 6]
        );
        assert_eq!(positions(&read(Position(3), Backward, 10).await), [3, 2, 1]);
        assert_eq!(positions(&read(Position(1), Backward, 10).await), [1]);
        assert!(read(Position::START, Backward, 10).await.is_empty());
        assert_eq!(store.head_position(), Position(9));

        // Paging forward with a small limit visits every event once.
        let mut paged = Vec::new();
        let mut from = Position::START;
        loop {
            let page = read(from, Forward, 2).await;
            let Some(last) = page.last() else { break };
            from = last.position.next();
            paged.extend(page);
        }
        assert_eq!(paged, log);
    }

    pub(crate) async fn read_all_filters(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let log = mixed_log(store).await;
        use ReadDirection::{Backward, Forward};
        let check = |filter: EventFilter,
                     from: Position,
                     direction: ReadDirection,
                     limit: usize,
                     expected: &'static [u64]| {
            let log = log.clone();
            async move {
                let read = store
                    .read_all(from, direction, limit, &filter)
                    .await
                    .unwrap();
                assert_eq!(
                    positions(&read),
                    expected,
                    "{filter:?} {direction:?} from {from:?} limit {limit}"
                );
                for event in &read {
                    assert_eq!(&log[event.position.0 as usize - 1], event);
                }
            }
        };
        let order = || EventFilter::Category("order".into());
        check(order(), Position::START, Forward, 100, &[1, 3, 4, 6, 8, 9]).await;
        check(order(), Position(4), Forward, 2, &[4, 6]).await;
        check(order(), Position(7), Forward, 10, &[8, 9]).await;
        check(order(), Position::END, Backward, 3, &[9, 8, 6]).await;
        check(order(), Position(5), Backward, 10, &[4, 3, 1]).await;
        let category = |c: &str| EventFilter::Category(c.into());
        check(category("customer"), Position::START, Forward, 100, &[2, 7]).await;
        check(category("orderline"), Position::START, Forward, 100, &[5]).await;
        check(category("ord"), Position::START, Forward, 100, &[]).await;
        check(category("nothing"), Position::END, Backward, 100, &[]).await;

        let types = || EventFilter::EventTypes(vec!["OrderPlaced".into(), "CustomerMoved".into()]);
        check(types(), Position::START, Forward, 100, &[1, 3, 6, 7]).await;
        check(types(), Position(2), Forward, 2, &[3, 6]).await;
        check(types(), Position::END, Backward, 2, &[7, 6]).await;
        check(
            EventFilter::EventTypes(Vec::new()),
            Position::START,
            Forward,
            100,
            &[],
        )
        .await;
        check(
            EventFilter::EventTypes(vec!["Order".into()]),
            Position::START,
            Forward,
            100,
            &[],
        )
        .await;

        let order_2 = || EventFilter::Stream(stream("order-2"));
        check(order_2(), Position::START, Forward, 100, &[3, 8, 9]).await;
        check(order_2(), Position::END, Backward, 100, &[9, 8, 3]).await;
        check(order_2(), Position(4), Forward, 1, &[8]).await;
        check(
            EventFilter::Stream(stream("order")),
            Position::START,
            Forward,
            100,
            &[6],
        )
        .await;

        check(EventFilter::All, Position(3), Forward, 4, &[3, 4, 5, 6]).await;
        check(EventFilter::All, Position(3), Backward, 4, &[3, 2, 1]).await;
    }

    /// `read_all` with a stream filter, from every position, both ways, in
    /// pages of several sizes, gives what the whole log gives filtered by
    /// hand (the sled store answers it from the stream's index).
    pub(crate) async fn a_stream_filter_pages_like_the_whole_log_filtered(open: Open) {
        use ReadDirection::{Backward, Forward};
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let ids = [stream("page-1"), stream("page-2"), stream("page-3")];
        for round in 0..12usize {
            let id = &ids[round * 7 % 3];
            append(store, id, ExpectedVersion::Any, events("p", 1 + round % 3)).await;
        }
        let all = whole_log(store).await;
        let head = store.head_position().0;
        for id in &ids {
            let filter = EventFilter::Stream(id.clone());
            for from in 0..=head + 1 {
                for (direction, limit) in [(Forward, 1), (Forward, 4), (Backward, 1), (Backward, 3)]
                {
                    let read = store
                        .read_all(Position(from), direction, limit, &filter)
                        .await
                        .unwrap();
                    let mut expected: Vec<u64> = all
                        .iter()
                        .filter(|event| &event.stream_id == id)
                        .map(|event| event.position.0)
                        .filter(|&position| match direction {
                            Forward => position >= from,
                            Backward => position <= from,
                        })
                        .collect();
                    if direction == Backward {
                        expected.reverse();
                    }
                    expected.truncate(limit);
                    assert_eq!(
                        positions(&read),
                        expected,
                        "{id} from {from} {direction:?} limit {limit}"
                    );
                }
            }
        }
    }

    pub(crate) async fn snapshots(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let a = stream("snap-1");
        let b = stream("snap-2");
        assert_eq!(store.load_snapshot(&a).await.unwrap(), None);

        let first = Snapshot {
            version: Version(3),
            payload: b"state at 3".to_vec(),
        };
        store.save_snapshot(&a, first.clone()).await.unwrap();
        assert_eq!(store.load_snapshot(&a).await.unwrap(), Some(first));
        assert_eq!(store.load_snapshot(&b).await.unwrap(), None);

        let second = Snapshot {
            version: Version(7),
            payload: vec![0, 1, 2, 255],
        };
        store.save_snapshot(&a, second.clone()).await.unwrap();
        let other = Snapshot {
            version: Version(1),
            payload: Vec::new(),
        };
        store.save_snapshot(&b, other.clone()).await.unwrap();
        assert_eq!(store.load_snapshot(&a).await.unwrap(), Some(second));
        assert_eq!(store.load_snapshot(&b).await.unwrap(), Some(other.clone()));

        store.delete_snapshot(&a).await.unwrap();
        assert_eq!(store.load_snapshot(&a).await.unwrap(), None);
        store.delete_snapshot(&a).await.unwrap();
        assert_eq!(store.load_snapshot(&b).await.unwrap(), Some(other));
        // Snapshots are not events.
        assert_eq!(store.head_position(), Position::START);
        assert_eq!(store.stream_version(&a).await.unwrap(), Version::NONE);
    }

    /// An actor that stopped late saves its snapshot after a newer actor
    /// saved a later one: the later one stays, however the saves race.
    pub(crate) async fn a_snapshot_never_replaces_a_newer_one(open: Open) {
        let Backend { store, keep } = open(Limits::default()).await;
        let _keep = keep;
        let store: std::sync::Arc<dyn EventStore> = store.into();
        let id = stream("snap-race-1");
        let at = |version: u64| Snapshot {
            version: Version(version),
            payload: version.to_be_bytes().to_vec(),
        };
        store.save_snapshot(&id, at(10)).await.unwrap();
        // Older: refused.
        store.save_snapshot(&id, at(4)).await.unwrap();
        assert_eq!(store.load_snapshot(&id).await.unwrap(), Some(at(10)));
        // The same version: the stored one stays.
        let same = Snapshot {
            version: Version(10),
            payload: b"another encoding".to_vec(),
        };
        store.save_snapshot(&id, same).await.unwrap();
        assert_eq!(store.load_snapshot(&id).await.unwrap(), Some(at(10)));
        // Newest first, so that a plain overwrite would end on the oldest.
        let savers: Vec<_> = (1..=64u64)
            .rev()
            .map(|version| {
                let (store, id) = (store.clone(), id.clone());
                tokio::spawn(async move { store.save_snapshot(&id, at(version * 3)).await })
            })
            .collect();
        for saver in savers {
            saver.await.unwrap().unwrap();
        }
        assert_eq!(store.load_snapshot(&id).await.unwrap(), Some(at(192)));
    }

    pub(crate) async fn snapshots_are_refused_after_shutdown(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("snap-closed-1");
        let snapshot = Snapshot {
            version: Version(1),
            payload: vec![1],
        };
        store.save_snapshot(&id, snapshot.clone()).await.unwrap();
        store.shutdown().await.unwrap();
        match store.save_snapshot(&id, snapshot.clone()).await {
            Err(StoreError::Closed) => {}
            other => panic!("expected Closed after shutdown, got {other:?}"),
        }
        match store.delete_snapshot(&id).await {
            Err(StoreError::Closed) => {}
            other => panic!("expected Closed after shutdown, got {other:?}"),
        }
        // Reads either still see the snapshot or fail with Closed (a store
        // that released its files), as `EventStore::shutdown` allows.
        match store.load_snapshot(&id).await {
            Ok(loaded) => assert_eq!(loaded, Some(snapshot)),
            Err(ReadError::Store(StoreError::Closed)) => {}
            Err(other) => panic!("expected the snapshot or Closed after shutdown, got {other:?}"),
        }
    }

    pub(crate) async fn checkpoints_are_refused_after_shutdown(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        store
            .save_checkpoint("closed-view", Position(0))
            .await
            .unwrap();
        store.shutdown().await.unwrap();
        match store.save_checkpoint("closed-view", Position(7)).await {
            Err(StoreError::Closed) => {}
            other => panic!("expected Closed for a checkpoint saved after shutdown, got {other:?}"),
        }
        // A read still sees the old position, or is Closed (sled).
        match store.load_checkpoint("closed-view").await {
            Ok(loaded) => assert_eq!(loaded, Some(Position(0))),
            Err(ReadError::Store(StoreError::Closed)) => {}
            Err(other) => panic!("expected the checkpoint or Closed after shutdown, got {other:?}"),
        }
    }

    pub(crate) async fn checkpoints(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        assert_eq!(store.load_checkpoint("orders-view").await.unwrap(), None);
        store
            .save_checkpoint("orders-view", Position(5))
            .await
            .unwrap();
        store
            .save_checkpoint("totals", Position::START)
            .await
            .unwrap();
        assert_eq!(
            store.load_checkpoint("orders-view").await.unwrap(),
            Some(Position(5))
        );
        store
            .save_checkpoint("orders-view", Position(12))
            .await
            .unwrap();
        assert_eq!(
            store.load_checkpoint("orders-view").await.unwrap(),
            Some(Position(12))
        );
        assert_eq!(
            store.load_checkpoint("totals").await.unwrap(),
            Some(Position::START)
        );
        assert_eq!(store.load_checkpoint("orders").await.unwrap(), None);
        store
            .save_checkpoint("far", Position(u64::MAX - 1))
            .await
            .unwrap();
        assert_eq!(
            store.load_checkpoint("far").await.unwrap(),
            Some(Position(u64::MAX - 1))
        );
    }

    pub(crate) async fn live_feed_delivers_commits_in_position_order(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        append(
            store,
            &stream("early-1"),
            ExpectedVersion::Any,
            events("early", 2),
        )
        .await;

        let mut feed = store.subscribe_live();
        let mut results = Vec::new();
        for (i, count) in [1usize, 3, 2, 1, 4].into_iter().enumerate() {
            let id = stream(&format!("live-{}", i % 2));
            results.push(append(store, &id, ExpectedVersion::Any, events("live", count)).await);
        }

        let log = whole_log(store).await;
        let mut delivered: Vec<RecordedEvent> = Vec::new();
        while delivered.len() < log.len() - 2 {
            let commit = next_commit(&mut feed).await.expect("feed error");
            assert!(!commit.is_empty(), "an empty commit was published");
            delivered.extend(commit.iter().cloned());
        }
        // Only what was committed after subscribing, every event once, in
        // position order, equal to what the store reads back.
        assert_eq!(delivered, log[2..]);
        assert_eq!(
            results.last().unwrap().last_position,
            delivered.last().unwrap().position
        );
        // And nothing more.
        let extra = tokio::time::timeout(Duration::from_millis(100), feed.recv()).await;
        assert!(
            extra.is_err(),
            "the feed delivered more than was committed: {extra:?}"
        );
    }

    pub(crate) async fn lagging_subscriber_never_blocks_appends(open: Open) {
        let capacity = 2;
        let backend = open(Limits {
            live_feed_capacity: capacity,
            ..Limits::default()
        })
        .await;
        let store = &*backend.store;
        let mut feed = store.subscribe_live();
        let id = stream("lag-1");
        let appends = 20u64;

        // The subscriber reads nothing while these commit: appends must not
        // wait for it.
        tokio::time::timeout(Duration::from_secs(10), async {
            for _ in 0..appends {
                append(store, &id, ExpectedVersion::Any, events("lag", 1)).await;
            }
        })
        .await
        .expect("appends waited for a lagging subscriber");

        // It learns that it lagged, by how much, and then gets the newest
        // commits it still can, with no gap after the lag.
        let dropped = match next_commit(&mut feed).await {
            Err(FeedError::Lagged(dropped)) => dropped,
            other => panic!("expected Lagged, got {other:?}"),
        };
        // Every append returned after its commit was published, so exactly
        // the oldest commits beyond the capacity were dropped.
        assert_eq!(
            dropped,
            appends - capacity as u64,
            "dropped commits with capacity {capacity}"
        );
        let mut expected = dropped + 1;
        while expected <= appends {
            let commit = next_commit(&mut feed).await.expect("no second lag");
            assert_eq!(positions(&commit), [expected]);
            expected += 1;
        }
        // It re-reads what it missed from the store, and follows new commits.
        let missed = store
            .read_all(
                Position(1),
                ReadDirection::Forward,
                dropped as usize,
                &EventFilter::All,
            )
            .await
            .unwrap();
        assert_eq!(positions(&missed), (1..=dropped).collect::<Vec<_>>());
        append(store, &id, ExpectedVersion::Any, events("after", 1)).await;
        let commit = next_commit(&mut feed).await.expect("feed after lag");
        assert_eq!(positions(&commit), [appends + 1]);
    }

    pub(crate) async fn metadata_round_trips(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let mut feed = store.subscribe_live();
        let id = stream("meta-1");

        let correlation = Uuid::now_v7();
        let mut extra = BTreeMap::new();
        extra.insert("tenant".to_owned(), "acme".to_owned());
        extra.insert("user".to_owned(), "ada ✓".to_owned());
        extra.insert("empty".to_owned(), String::new());
        let chosen_id = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let full = NewEvent::new("OrderPlaced", vec![0, 159, 146, 150, 255])
            .with_id(chosen_id)
            .with_schema_version(3)
            .with_metadata(Metadata {
                correlation_id: Some(correlation),
                causation_id: Some(Uuid::now_v7()),
                extra,
            });
        let bare = NewEvent::new("OrderNoted", Vec::new()).with_schema_version(u16::MAX);
        let sent = vec![full, bare];

        let before = SystemTime::now();
        append(store, &id, ExpectedVersion::NoStream, sent.clone()).await;
        let after = SystemTime::now();

        let read = whole_stream(store, &id).await;
        assert_eq!(read.len(), 2);
        for (recorded, sent) in read.iter().zip(&sent) {
            assert_eq!(recorded.event_id, sent.event_id);
            assert_eq!(recorded.event_type, sent.event_type);
            assert_eq!(recorded.schema_version, sent.schema_version);
            assert_eq!(recorded.metadata, sent.metadata);
            assert_eq!(recorded.payload, sent.payload);
            assert_eq!(recorded.stream_id, id);
            let micros = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_micros() as u64;
            assert!(
                micros(before) <= recorded.recorded_at_micros
                    && recorded.recorded_at_micros <= micros(after),
                "recorded_at {} outside the append's call",
                recorded.recorded_at_micros
            );
        }
        assert_eq!(read[0].event_id, chosen_id);
        // The same event, whichever way it is read.
        assert_eq!(whole_log(store).await, read);
        let delivered = next_commit(&mut feed).await.unwrap();
        assert_eq!(&delivered[..], &read[..]);
    }

    pub(crate) async fn shutdown_refuses_appends(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let id = stream("closing-1");
        append(store, &id, ExpectedVersion::Any, events("a", 2)).await;

        store.shutdown().await.unwrap();
        match store
            .append(&id, ExpectedVersion::Any, events("b", 1))
            .await
        {
            Err(AppendError::Store(StoreError::Closed)) => {}
            other => panic!("expected Closed after shutdown, got {other:?}"),
        }
        store.shutdown().await.expect("a second shutdown is fine");
        // Reads either still see what was committed (memory) or fail with
        // Closed (sled, which has released its files); never anything else.
        match store
            .read_stream(&id, Version::FIRST, ReadDirection::Forward, 10)
            .await
        {
            Ok(events) => assert_eq!(versions(&events), [1, 2]),
            Err(ReadError::Store(StoreError::Closed)) => {}
            Err(other) => panic!("expected the events or Closed after shutdown, got {other:?}"),
        }
    }

    pub(crate) async fn shutdown_closes_the_live_feed(open: Open) {
        let backend = open(Limits::default()).await;
        let store = &*backend.store;
        let mut feed = store.subscribe_live();
        let id = stream("closing-2");
        append(store, &id, ExpectedVersion::Any, events("a", 2)).await;
        store.shutdown().await.unwrap();

        // A subscriber first gets every commit made before the shutdown,
        // then learns that the store shut down, instead of waiting forever.
        let commit = next_commit(&mut feed).await.expect("the last commit");
        assert_eq!(positions(&commit), [1, 2]);
        assert_eq!(next_commit(&mut feed).await, Err(FeedError::Closed));
        // So does one that subscribes after the shutdown.
        let mut late = store.subscribe_live();
        assert_eq!(next_commit(&mut late).await, Err(FeedError::Closed));
    }
}
