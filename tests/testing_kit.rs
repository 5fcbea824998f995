//! The test kits themselves: `AggregateTest` and `ProjectionTest` pass what
//! they should, and a failing assertion panics at the caller's line
//! (`#[track_caller]`) with a message that names the expected and the
//! actual side.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

use annals::codec::{encode_value, CodecError, Upcasters};
use annals::projection::{ProjectionContext, ProjectionError};
use annals::store::EventFilter;
use annals::testing::{AggregateTest, ProjectionTest};
use annals::{
    Aggregate, DomainEvent, NewEvent, Position, Projection, RecordedEvent, TypedProjection, Version,
};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------
// A small domain: a counter that refuses to go past its limit.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum CounterEvent {
    Added(u32),
    /// Stored as `Reset` by an older release.
    Cleared,
}

impl DomainEvent for CounterEvent {
    fn upcasters(upcasters: &mut Upcasters) {
        upcasters.rename("Reset", "Cleared");
    }
}

#[derive(Debug)]
enum CounterCommand {
    Add(u32),
    AddTwice(u32),
    Clear,
}

#[derive(Debug, PartialEq)]
enum CounterError {
    Overflow { value: u32, limit: u32 },
    AlreadyClear,
}

impl std::fmt::Display for CounterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CounterError::Overflow { value, limit } => write!(f, "{value} is over {limit}"),
            CounterError::AlreadyClear => f.write_str("already clear"),
        }
    }
}

impl std::error::Error for CounterError {}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Counter {
    value: u32,
}

const LIMIT: u32 = 10;

impl Aggregate for Counter {
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Error = CounterError;
    const CATEGORY: &'static str = "counter";

    fn handle(&self, command: &CounterCommand) -> Result<Vec<CounterEvent>, CounterError> {
        let add = |n: u32, times: u32| {
            let value = self.value + n * times;
            if value > LIMIT {
                Err(CounterError::Overflow {
                    value,
                    limit: LIMIT,
                })
            } else {
                Ok(vec![CounterEvent::Added(n); times as usize])
            }
        };
        match command {
            CounterCommand::Add(n) => add(*n, 1),
            CounterCommand::AddTwice(n) => add(*n, 2),
            CounterCommand::Clear if self.value == 0 => Err(CounterError::AlreadyClear),
            CounterCommand::Clear => Ok(vec![CounterEvent::Cleared]),
        }
    }

    fn apply(&mut self, event: &CounterEvent) {
        match event {
            CounterEvent::Added(n) => self.value += n,
            CounterEvent::Cleared => self.value = 0,
        }
    }
}

// ---------------------------------------------------------------------------
// Where a panic happened: a hook, installed once, records the location of
// each panic on the panicking thread, so that tests running in parallel do
// not see each other's.

thread_local! {
    static LAST_PANIC: RefCell<Option<(String, u32, String)>> = const { RefCell::new(None) };
}

/// Runs `f`, which must panic, and returns the panic's file, line and
/// message.
fn panic_of(f: impl FnOnce()) -> (String, u32, String) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let (file, line) = info
                .location()
                .map_or((String::new(), 0), |l| (l.file().to_owned(), l.line()));
            LAST_PANIC.with(|last| *last.borrow_mut() = Some((file, line, message)));
            default(info);
        }));
    });
    LAST_PANIC.with(|last| last.borrow_mut().take());
    let outcome = catch_unwind(AssertUnwindSafe(f));
    assert!(outcome.is_err(), "expected a panic");
    LAST_PANIC
        .with(|last| last.borrow_mut().take())
        .expect("the hook saw the panic")
}

// ---------------------------------------------------------------------------
// The aggregate kit.

#[test]
fn given_and_then_expect_events_take_arrays_vectors_and_iterators() {
    let state = AggregateTest::<Counter>::given([CounterEvent::Added(2)])
        .when(CounterCommand::AddTwice(3))
        .then_expect_events([CounterEvent::Added(3), CounterEvent::Added(3)]);
    assert_eq!(state, Counter { value: 8 });

    let state = AggregateTest::<Counter>::given(vec![CounterEvent::Added(1); 4])
        .when(CounterCommand::Add(1))
        .then_expect_events(vec![CounterEvent::Added(1)]);
    assert_eq!(state.value, 5);

    let state = AggregateTest::<Counter>::given((1..=3).map(CounterEvent::Added))
        .when(CounterCommand::Clear)
        .then_expect_events(std::iter::once(CounterEvent::Cleared));
    assert_eq!(state.value, 0);

    AggregateTest::<Counter>::given_no_previous_events()
        .when(CounterCommand::Clear)
        .then_expect_error(CounterError::AlreadyClear);
    AggregateTest::<Counter>::given([CounterEvent::Added(9)])
        .when(CounterCommand::Add(2))
        .then_expect_error_message("11 is over 10");
}

#[test]
#[should_panic(expected = "expected events: [Added(4)]\n  actual events: [Added(4), Added(4)]")]
fn other_events_name_the_expected_and_the_actual_ones() {
    AggregateTest::<Counter>::given_no_previous_events()
        .when(CounterCommand::AddTwice(4))
        .then_expect_events([CounterEvent::Added(4)]);
}

#[test]
#[should_panic(expected = "expected events: [Added(4)]\n  actual error: Overflow")]
fn a_refusal_where_events_were_expected_names_the_error() {
    AggregateTest::<Counter>::given([CounterEvent::Added(10)])
        .when(CounterCommand::Add(4))
        .then_expect_events([CounterEvent::Added(4)]);
}

#[test]
#[should_panic(expected = "expected error: AlreadyClear\n  actual error: Overflow")]
fn another_error_names_the_expected_and_the_actual_one() {
    AggregateTest::<Counter>::given([CounterEvent::Added(10)])
        .when(CounterCommand::Add(4))
        .then_expect_error(CounterError::AlreadyClear);
}

#[test]
#[should_panic(expected = "expected error: AlreadyClear\n actual events: [Cleared]")]
fn events_where_an_error_was_expected_are_named() {
    AggregateTest::<Counter>::given([CounterEvent::Added(1)])
        .when(CounterCommand::Clear)
        .then_expect_error(CounterError::AlreadyClear);
}

#[test]
#[should_panic(
    expected = "expected error message: \"already clear\"\n  actual error message: \"14 is over 10\""
)]
fn another_error_message_names_both_messages() {
    AggregateTest::<Counter>::given([CounterEvent::Added(10)])
        .when(CounterCommand::Add(4))
        .then_expect_error_message("already clear");
}

#[test]
fn aggregate_assertions_fail_at_the_callers_line() {
    let (file, line, message) = panic_of(|| {
        let result =
            AggregateTest::<Counter>::given_no_previous_events().when(CounterCommand::Add(1));
        result.then_expect_events([CounterEvent::Added(2)]); // the line reported
    });
    assert_eq!((file.as_str(), line), (file!(), line!() - 2), "{message}");

    let (file, line, _) = panic_of(|| {
        let result =
            AggregateTest::<Counter>::given_no_previous_events().when(CounterCommand::Add(1));
        result.then_expect_error(CounterError::AlreadyClear); // the line reported
    });
    assert_eq!((file.as_str(), line), (file!(), line!() - 2));

    let (file, line, _) = panic_of(|| {
        let result =
            AggregateTest::<Counter>::given_no_previous_events().when(CounterCommand::Clear);
        result.then_expect_error_message("nope"); // the line reported
    });
    assert_eq!((file.as_str(), line), (file!(), line!() - 2));
}

/// Not a plain enum: the codec cannot store it, and the kit says so.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NotAnEnum(u32);
impl DomainEvent for NotAnEnum {}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Unstorable;

impl Aggregate for Unstorable {
    type Command = ();
    type Event = NotAnEnum;
    type Error = CounterError;
    const CATEGORY: &'static str = "unstorable";
    fn handle(&self, _: &()) -> Result<Vec<NotAnEnum>, CounterError> {
        Ok(vec![NotAnEnum(1)])
    }
    fn apply(&mut self, _: &NotAnEnum) {}
}

#[test]
fn a_given_event_the_store_could_not_hold_fails_at_the_callers_line() {
    let (file, line, message) = panic_of(|| {
        AggregateTest::<Unstorable>::given([NotAnEnum(1)]); // the line reported
    });
    assert_eq!((file.as_str(), line), (file!(), line!() - 2));
    assert!(
        message.contains("NotAnEnum(1) does not encode"),
        "{message}"
    );
}

// ---------------------------------------------------------------------------
// The projection kit: a plain projection that records what it was handed,
// and a typed one that sums the counters per stream.

#[derive(Debug, Default)]
struct Recorder {
    /// (stream, version, position, event type) of each event handled.
    seen: Vec<(String, Version, Position, String)>,
    /// Fails on this position, when set.
    fail_at: Option<Position>,
}

impl Projection for Recorder {
    async fn handle(
        &mut self,
        event: &RecordedEvent,
        context: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        assert_eq!(context.position(), event.position);
        assert_eq!(context.attempt(), 1);
        if self.fail_at == Some(event.position) {
            return Err(ProjectionError::handler("the read model is full"));
        }
        self.seen.push((
            event.stream_id.to_string(),
            event.version,
            event.position,
            event.event_type.clone(),
        ));
        Ok(())
    }
}

#[derive(Debug, Default, PartialEq)]
struct Totals {
    per_stream: BTreeMap<String, u32>,
}

impl TypedProjection for Totals {
    type Event = CounterEvent;

    async fn handle(
        &mut self,
        event: CounterEvent,
        recorded: &RecordedEvent,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        let total = self
            .per_stream
            .entry(recorded.stream_id.to_string())
            .or_default();
        match event {
            CounterEvent::Added(n) => *total += n,
            CounterEvent::Cleared => *total = 0,
        }
        Ok(())
    }
}

fn totals(entries: &[(&str, u32)]) -> Totals {
    Totals {
        per_stream: entries.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
    }
}

#[tokio::test]
async fn a_projection_sees_versions_per_stream_and_positions_across_them() {
    let recorder = ProjectionTest::new(Recorder::default())
        .given(
            "counter-1",
            [CounterEvent::Added(1), CounterEvent::Added(2)],
        )
        .given("other-1", [CounterEvent::Cleared])
        .given("counter-2", [CounterEvent::Added(5)])
        .given("counter-1", [CounterEvent::Cleared])
        .filter(EventFilter::Category("counter".into()))
        .when_projected()
        .await
        .then_expect_ok();
    let seen: Vec<(&str, u64, u64, &str)> = recorder
        .seen
        .iter()
        .map(|(s, v, p, t)| (s.as_str(), v.0, p.0, t.as_str()))
        .collect();
    // `other-1` is filtered out but keeps its position 3.
    assert_eq!(
        seen,
        [
            ("counter-1", 1, 1, "Added"),
            ("counter-1", 2, 2, "Added"),
            ("counter-2", 1, 4, "Added"),
            ("counter-1", 3, 5, "Cleared"),
        ]
    );
}

#[tokio::test]
async fn a_typed_projection_reads_renamed_types_and_is_compared_whole() {
    let reset = NewEvent::new("Reset", Vec::new());
    ProjectionTest::new(Totals::default())
        .given(
            "counter-1",
            [CounterEvent::Added(3), CounterEvent::Added(4)],
        )
        .given("counter-2", [CounterEvent::Added(6)])
        .given_new_events("counter-2", [reset])
        .given("counter-2", [CounterEvent::Added(1)])
        .when_projected_typed()
        .await
        .then_expect_projection(totals(&[("counter-1", 7), ("counter-2", 1)]));
}

#[tokio::test]
#[should_panic(
    expected = "expected projection: Totals { per_stream: {\"counter-1\": 8} }\n  \
                           actual projection: Totals { per_stream: {\"counter-1\": 7} }"
)]
async fn another_projection_names_the_expected_and_the_actual_one() {
    ProjectionTest::new(Totals::default())
        .given(
            "counter-1",
            [CounterEvent::Added(3), CounterEvent::Added(4)],
        )
        .when_projected_typed()
        .await
        .then_expect_projection(totals(&[("counter-1", 8)]));
}

#[tokio::test]
async fn a_failing_handler_stops_the_run_at_its_event() {
    let recorder = Recorder {
        fail_at: Some(Position(2)),
        ..Recorder::default()
    };
    let error = ProjectionTest::new(recorder)
        .given("counter-1", vec![CounterEvent::Added(1); 3])
        .when_projected()
        .await
        .then_expect_failure_at(Position(2));
    assert!(matches!(error, ProjectionError::Handler(_)), "{error:?}");

    let (recorder, failure) = ProjectionTest::new(Recorder {
        fail_at: Some(Position(2)),
        ..Recorder::default()
    })
    .given("counter-1", vec![CounterEvent::Added(1); 3])
    .when_projected()
    .await
    .inspect_result();
    assert_eq!(recorder.seen.len(), 1, "nothing after the failure");
    assert_eq!(failure.map(|(position, _)| position), Some(Position(2)));
}

#[tokio::test]
async fn an_undecodable_event_fails_a_typed_projection_naming_stream_and_version() {
    let payload = encode_value(&7u32).unwrap();
    let error = ProjectionTest::new(Totals::default())
        .given("counter-1", [CounterEvent::Added(3)])
        .given_new_events("counter-1", [NewEvent::new("Doubled", payload)])
        .when_projected_typed()
        .await
        .then_expect_failure_at(Position(2));
    match error {
        ProjectionError::Codec(CodecError::UnknownEventType {
            stream_id,
            version,
            event_type,
        }) => {
            assert_eq!(stream_id.as_str(), "counter-1");
            assert_eq!(version, Version(2));
            assert_eq!(event_type, "Doubled");
        }
        other => panic!("expected UnknownEventType, got {other:?}"),
    }
}

#[tokio::test]
async fn projection_assertions_fail_at_the_callers_line_naming_both_sides() {
    let failed = || {
        ProjectionTest::new(Recorder {
            fail_at: Some(Position(1)),
            ..Recorder::default()
        })
        .given("counter-1", [CounterEvent::Added(1)])
    };

    let result = failed().when_projected().await;
    let (file, line, message) = panic_of(|| {
        result.then_expect_ok(); // the line reported
    });
    assert_eq!((file.as_str(), line), (file!(), line!() - 2));
    assert!(
        message.contains("expected: every event handled\n  actual: the event at position 1 failed"),
        "{message}"
    );

    let result = failed().when_projected().await;
    let (file, line, message) = panic_of(|| {
        result.then_expect_failure_at(Position(3)); // the line reported
    });
    assert_eq!((file.as_str(), line), (file!(), line!() - 2));
    assert!(
        message.contains("expected: a failure at position 3\n  actual: a failure at position 1"),
        "{message}"
    );

    let result = ProjectionTest::new(Totals::default())
        .when_projected_typed()
        .await;
    let (file, line, message) = panic_of(|| {
        result.then_expect_failure_at(Position(1)); // the line reported
    });
    assert_eq!((file.as_str(), line), (file!(), line!() - 2));
    assert!(
        message.contains("expected: a failure at position 1\n  actual: every event handled"),
        "{message}"
    );

    let result = ProjectionTest::new(Totals::default())
        .given("counter-1", [CounterEvent::Added(1)])
        .when_projected_typed()
        .await;
    let (file, line, _) = panic_of(|| {
        result.then_expect_projection(Totals::default()); // the line reported
    });
    assert_eq!((file.as_str(), line), (file!(), line!() - 2));
}
