//! Test helpers that need no store: a given/when/then harness for
//! [`Aggregate`]s, in the style of cqrs-es. Given these past events, when
//! this command, then these events (or this error).
//!
//! ```
//! # use annals::{Aggregate, AggregateTest, DomainEvent};
//! # use serde::{Deserialize, Serialize};
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! enum CounterEvent { Incremented }
//! impl DomainEvent for CounterEvent {}
//!
//! #[derive(Debug, thiserror::Error, PartialEq)]
//! #[error("the counter is full")]
//! struct Full;
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
//! AggregateTest::<Counter>::given_no_previous_events()
//!     .when(())
//!     .then_expect_events(vec![CounterEvent::Incremented]);
//! AggregateTest::<Counter>::given(vec![CounterEvent::Incremented; 2])
//!     .when(())
//!     .then_expect_error(Full);
//! ```

use std::fmt::Debug;

use crate::aggregate::Aggregate;
use crate::codec::{decode_event_parts, encode_event};

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
    pub fn given(events: impl IntoIterator<Item = A::Event>) -> Self {
        let mut state = A::default();
        for event in events {
            state.apply(&round_trip::<A>(&event));
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
    /// When the command was refused or produced other events.
    pub fn then_expect_events(self, expected: Vec<A::Event>) -> A
    where
        A::Event: PartialEq,
    {
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected, "the command produced other events");
                let mut state = self.state;
                for event in &events {
                    state.apply(&round_trip::<A>(event));
                }
                state
            }
            Err(error) => panic!("expected events {expected:?}, the command was refused: {error}"),
        }
    }

    /// Asserts that the domain refused the command with `expected`.
    ///
    /// # Panics
    /// When the command produced events or another error.
    pub fn then_expect_error(self, expected: A::Error)
    where
        A::Error: PartialEq,
    {
        match self.result {
            Ok(events) => panic!("expected error {expected:?}, the command produced {events:?}"),
            Err(error) => assert_eq!(error, expected, "the command was refused otherwise"),
        }
    }

    /// Asserts that the domain refused the command with an error whose
    /// message (`Display`) is `expected`.
    ///
    /// # Panics
    /// When the command produced events or an error with another message.
    pub fn then_expect_error_message(self, expected: &str) {
        match self.result {
            Ok(events) => panic!("expected error {expected:?}, the command produced {events:?}"),
            Err(error) => assert_eq!(error.to_string(), expected),
        }
    }

    /// The raw outcome, for checks the helpers above do not cover.
    pub fn inspect_result(self) -> Result<Vec<A::Event>, A::Error> {
        self.result
    }
}

/// Encodes and decodes an event as the store would, so that a test catches
/// an event type the codec cannot store.
fn round_trip<A: Aggregate>(event: &A::Event) -> A::Event {
    let encoded = encode_event(event).unwrap_or_else(|e| panic!("{event:?} does not encode: {e}"));
    decode_event_parts(
        &encoded.event_type,
        encoded.schema_version,
        &encoded.payload,
    )
    .unwrap_or_else(|e| panic!("{event:?} does not decode: {e}"))
}
