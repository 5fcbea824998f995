//! Test kits that need no store, in the style of cqrs-es: a
//! given/when/then harness for [`Aggregate`]s (given these past events, when
//! this command, then these events or this error), and one for projections
//! (given these events in these streams, when projected, then this read
//! model). Every assertion is `#[track_caller]`, so a failure points at the
//! test's line, and its message names the expected and the actual side.
//!
//! ```
//! use annals::{Aggregate, DomainEvent};
//! use annals::testing::AggregateTest;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! enum CounterEvent { Incremented }
//! impl DomainEvent for CounterEvent {}
//!
//! // A domain error is any `std::error::Error`; two short impls make one.
//! #[derive(Debug, PartialEq)]
//! struct Full;
//! impl std::fmt::Display for Full {
//!     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
//!         f.write_str("the counter is full")
//!     }
//! }
//! impl std::error::Error for Full {}
//!
//! #[derive(Debug, Clone, Default, Serialize, Deserialize)]
//! struct Counter { value: u32 }
//!
//! impl Aggregate for Counter {
//!     type Command = ();
//!     type Event = CounterEvent;
//!     type Error = Full;
//!     const CATEGORY: &'static str = "counter";
//!     fn handle(&self, _: &()) -> Result<Vec<CounterEvent>, Full> {
//!         if self.value >= 2 { Err(Full) } else { Ok(vec![CounterEvent::Incremented]) }
//!     }
//!     fn apply(&mut self, _: &CounterEvent) { self.value += 1; }
//! }
//!
//! let counter = AggregateTest::<Counter>::given_no_previous_events()
//!     .when(())
//!     .then_expect_events([CounterEvent::Incremented]);
//! assert_eq!(counter.value, 1);
//! AggregateTest::<Counter>::given(vec![CounterEvent::Incremented; 2])
//!     .when(())
//!     .then_expect_error(Full);
//! ```
//!
//! A projection is tested the same way, through its own `handle`:
//!
//! ```
//! use annals::{DomainEvent, RecordedEvent, TypedProjection};
//! use annals::projection::{ProjectionContext, ProjectionError};
//! use annals::testing::ProjectionTest;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! enum OrderEvent { Placed { cents: u64 }, Shipped }
//! impl DomainEvent for OrderEvent {}
//!
//! /// Revenue per order stream.
//! #[derive(Debug, Default, PartialEq)]
//! struct Revenue { cents: std::collections::BTreeMap<String, u64> }
//!
//! impl TypedProjection for Revenue {
//!     type Event = OrderEvent;
//!     async fn handle(
//!         &mut self,
//!         event: OrderEvent,
//!         recorded: &RecordedEvent,
//!         _: &ProjectionContext,
//!     ) -> Result<(), ProjectionError> {
//!         if let OrderEvent::Placed { cents } = event {
//!             *self.cents.entry(recorded.stream_id.to_string()).or_default() += cents;
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let revenue = ProjectionTest::new(Revenue::default())
//!     .given("order-1", [OrderEvent::Placed { cents: 250 }, OrderEvent::Shipped])
//!     .given("order-2", [OrderEvent::Placed { cents: 100 }])
//!     .when_projected_typed()
//!     .await
//!     .then_expect_ok();
//! assert_eq!(revenue.cents["order-1"], 250);
//! assert_eq!(revenue.cents.len(), 2);
//! # }
//! ```

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use crate::aggregate::Aggregate;
use crate::codec::{decode_event_parts, encode_event, DomainEvent};
use crate::error::ProjectionError;
use crate::event::{now_micros, EventFilter, NewEvent, Position, RecordedEvent, StreamId, Version};
use crate::projection::{Projection, ProjectionContext, Typed, TypedProjection};

pub use crate::faults::{FaultCounts, FaultPlan, FaultyStore, InjectedFault};

mod process_manager;
pub use self::process_manager::{ProcessManagerTest, ProcessManagerTestResult};

/// The "given" step: an aggregate rebuilt from past events.
#[derive(Debug)]
pub struct AggregateTest<A: Aggregate> {
    state: A,
}

impl<A: Aggregate + Debug> AggregateTest<A> {
    /// Starts from the default state (a new stream).
    pub fn given_no_previous_events() -> Self {
        Self {
            state: A::default(),
        }
    }

    /// Starts from the state after `events`, applied in order.
    ///
    /// # Panics
    /// When an event does not survive an encode/decode round trip through
    /// the codec: what the test gives must be what a store could hold.
    #[track_caller]
    pub fn given(events: impl IntoIterator<Item = A::Event>) -> Self {
        let mut state = A::default();
        for event in events {
            state.apply(&round_trip::<A::Event>(&event));
        }
        Self { state }
    }

    /// Runs `command` through [`Aggregate::handle`].
    pub fn when(self, command: A::Command) -> AggregateTestResult<A> {
        let result = self.state.handle(&command);
        AggregateTestResult {
            state: self.state,
            result,
        }
    }
}

/// The "then" step: what [`Aggregate::handle`] decided.
#[derive(Debug)]
pub struct AggregateTestResult<A: Aggregate> {
    state: A,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate + Debug> AggregateTestResult<A> {
    /// Asserts that the command produced exactly `expected`, in order, and
    /// that they survive the codec and apply without panicking. Returns the
    /// state after them, for further checks.
    ///
    /// # Panics
    /// When the command was refused or produced other events; the message
    /// shows the expected events and the actual outcome.
    #[track_caller]
    pub fn then_expect_events(self, expected: impl IntoIterator<Item = A::Event>) -> A
    where
        A::Event: PartialEq,
    {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.result {
            Ok(events) => {
                if events != expected {
                    panic!(
                        "the command produced other events\n\
                         expected events: {expected:?}\n  actual events: {events:?}"
                    );
                }
                let mut state = self.state;
                for event in &events {
                    state.apply(&round_trip::<A::Event>(event));
                }
                state
            }
            Err(error) => panic!(
                "the command was refused\nexpected events: {expected:?}\n  actual error: \
                 {error:?} ({error})"
            ),
        }
    }

    /// Asserts that the domain refused the command with `expected`.
    ///
    /// # Panics
    /// When the command produced events or another error; the message shows
    /// the expected error and the actual outcome.
    #[track_caller]
    pub fn then_expect_error(self, expected: A::Error)
    where
        A::Error: PartialEq,
    {
        match self.result {
            Ok(events) => panic!(
                "the command was not refused\nexpected error: {expected:?}\n actual events: \
                 {events:?}"
            ),
            Err(error) if error == expected => {}
            Err(error) => panic!(
                "the command was refused otherwise\nexpected error: {expected:?}\n  actual \
                 error: {error:?}"
            ),
        }
    }

    /// Asserts that the domain refused the command with an error whose
    /// message (`Display`) is `expected`.
    ///
    /// # Panics
    /// When the command produced events or an error with another message;
    /// the message shows the expected and the actual side.
    #[track_caller]
    pub fn then_expect_error_message(self, expected: &str) {
        match self.result {
            Ok(events) => panic!(
                "the command was not refused\nexpected error message: {expected:?}\n    actual \
                 events: {events:?}"
            ),
            Err(error) if error.to_string() == expected => {}
            Err(error) => panic!(
                "the command was refused otherwise\nexpected error message: {expected:?}\n  \
                 actual error message: {:?}",
                error.to_string()
            ),
        }
    }

    /// The raw outcome, for checks the helpers above do not cover.
    pub fn inspect_result(self) -> Result<Vec<A::Event>, A::Error> {
        self.result
    }
}

/// Encodes and decodes an event as the store would, so that a test catches
/// an event type the codec cannot store.
#[track_caller]
fn round_trip<E: DomainEvent>(event: &E) -> E {
    let encoded = match encode_event(event) {
        Ok(encoded) => encoded,
        Err(e) => panic!("{event:?} does not encode: {e}"),
    };
    match decode_event_parts(
        &encoded.event_type,
        encoded.schema_version,
        &encoded.payload,
    ) {
        Ok(decoded) => decoded,
        Err(e) => panic!("{event:?} does not decode: {e}"),
    }
}

/// The "given" step of a projection test: a log built in memory, one
/// stream at a time, handed to the projection's own `handle` in position
/// order by [`ProjectionTest::when_projected`] (a [`Projection`]) or
/// [`ProjectionTest::when_projected_typed`] (a [`TypedProjection`]).
///
/// Events get what a store would give them: stream versions from 1, global
/// positions from 1 in the order given, a fresh event id and the current
/// time. Each event is handled once (attempt 1): the kit does not retry.
#[derive(Debug)]
pub struct ProjectionTest<P> {
    projection: P,
    filter: EventFilter,
    log: Vec<RecordedEvent>,
    versions: HashMap<StreamId, Version>,
}

impl<P> ProjectionTest<P> {
    /// Starts from `projection` and an empty log.
    pub fn new(projection: P) -> Self {
        Self {
            projection,
            filter: EventFilter::All,
            log: Vec::new(),
            versions: HashMap::new(),
        }
    }

    /// Hands the projection only the events that pass `filter`, as
    /// [`crate::ProjectionConfig::filter`] does; the others keep their
    /// positions, so the delivered positions have gaps as in production.
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Appends `events` to `stream`, encoded by the codec as the runtime
    /// stores them.
    ///
    /// # Panics
    /// When `stream` is not a valid stream id or an event does not encode.
    #[track_caller]
    pub fn given<E: DomainEvent>(self, stream: &str, events: impl IntoIterator<Item = E>) -> Self {
        let mut encoded = Vec::new();
        for event in events {
            match encode_event(&event) {
                Ok(new) => encoded.push(new),
                Err(e) => panic!("{event:?} does not encode: {e}"),
            }
        }
        self.given_new_events(stream, encoded)
    }

    /// Appends already-encoded `events` to `stream`, for what typed events
    /// cannot express: an old event type name, an old schema version,
    /// metadata, a payload that does not decode.
    ///
    /// # Panics
    /// When `stream` is not a valid stream id.
    #[track_caller]
    pub fn given_new_events(
        mut self,
        stream: &str,
        events: impl IntoIterator<Item = NewEvent>,
    ) -> Self {
        let stream_id = match StreamId::new(stream) {
            Ok(id) => id,
            Err(e) => panic!("{stream:?} is not a stream id: {e}"),
        };
        let version = self.versions.entry(stream_id.clone()).or_insert(Version(0));
        for new in events {
            *version = version.next();
            self.log.push(RecordedEvent {
                event_id: new.event_id,
                stream_id: stream_id.clone(),
                version: *version,
                position: Position(self.log.len() as u64 + 1),
                event_type: new.event_type,
                schema_version: new.schema_version,
                recorded_at_micros: now_micros(),
                metadata: new.metadata,
                payload: new.payload,
            });
        }
        self
    }

    /// Feeds the log to `projection` until the end or the first failure.
    async fn run<Q: Projection>(
        projection: &mut Q,
        log: &[RecordedEvent],
        filter: &EventFilter,
    ) -> Option<(Position, ProjectionError)> {
        let name: Arc<str> = Arc::from("test");
        for event in log {
            if !filter.matches(event.stream_id.as_str(), &event.event_type) {
                continue;
            }
            let context = ProjectionContext::new(Arc::clone(&name), event.position, 1);
            if let Err(error) = projection.handle(event, &context).await {
                return Some((event.position, error));
            }
        }
        None
    }
}

impl<P: Projection> ProjectionTest<P> {
    /// Hands every given event that passes the filter to
    /// [`Projection::handle`], in position order, stopping at the first
    /// error.
    pub async fn when_projected(mut self) -> ProjectionTestResult<P> {
        let failure = Self::run(&mut self.projection, &self.log, &self.filter).await;
        ProjectionTestResult {
            projection: self.projection,
            failure,
        }
    }
}

impl<P: TypedProjection> ProjectionTest<P> {
    /// As [`ProjectionTest::when_projected`], for a [`TypedProjection`]:
    /// each event is decoded as [`Typed`] decodes it in production, and an
    /// event that does not decode is the failure
    /// ([`ProjectionError::Codec`]).
    pub async fn when_projected_typed(self) -> ProjectionTestResult<P> {
        let mut typed = Typed(self.projection);
        let failure = Self::run(&mut typed, &self.log, &self.filter).await;
        ProjectionTestResult {
            projection: typed.0,
            failure,
        }
    }
}

/// The "then" step of a projection test: the projection after the events,
/// and the failure that stopped it, if one did.
#[derive(Debug)]
pub struct ProjectionTestResult<P> {
    projection: P,
    failure: Option<(Position, ProjectionError)>,
}

impl<P> ProjectionTestResult<P> {
    /// Asserts that every event was handled without error, and returns the
    /// projection for checks on its state or on what it exposes.
    ///
    /// # Panics
    /// When an event failed; the message names its position and the error.
    #[track_caller]
    pub fn then_expect_ok(self) -> P {
        if let Some((position, error)) = self.failure {
            panic!(
                "the projection failed\nexpected: every event handled\n  actual: the event at \
                 position {position} failed: {error}"
            );
        }
        self.projection
    }

    /// Asserts that every event was handled and the projection equals
    /// `expected`. Returns it.
    ///
    /// # Panics
    /// When an event failed or the projection differs; the message shows
    /// the expected and the actual projection.
    #[track_caller]
    pub fn then_expect_projection(self, expected: P) -> P
    where
        P: PartialEq + Debug,
    {
        let actual = self.then_expect_ok();
        if actual != expected {
            panic!(
                "the projection differs\nexpected projection: {expected:?}\n  actual \
                 projection: {actual:?}"
            );
        }
        actual
    }

    /// Asserts that the event at `position` failed (the run stopped there)
    /// and returns the error, for checks on it.
    ///
    /// # Panics
    /// When every event was handled, or another one failed.
    #[track_caller]
    pub fn then_expect_failure_at(self, position: Position) -> ProjectionError {
        match self.failure {
            Some((failed, error)) if failed == position => error,
            Some((failed, error)) => panic!(
                "the projection failed elsewhere\nexpected: a failure at position {position}\n  \
                 actual: a failure at position {failed}: {error}"
            ),
            None => panic!(
                "the projection did not fail\nexpected: a failure at position {position}\n  \
                 actual: every event handled"
            ),
        }
    }

    /// The projection and the failure that stopped it (position and
    /// error), for checks the helpers above do not cover.
    pub fn inspect_result(self) -> (P, Option<(Position, ProjectionError)>) {
        (self.projection, self.failure)
    }
}
