//! The user's domain: an [`Aggregate`] decides with a pure
//! [`handle`](Aggregate::handle) that turns a command into events or a
//! domain error, and evolves with a rule-free [`apply`](Aggregate::apply).
//! The runtime ([`crate::Runtime`]) hosts each aggregate instance in its own
//! actor; [`crate::testing::AggregateTest`] checks one without a store.

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::DomainEvent;

/// One consistency boundary of the domain (an order, an account), rebuilt
/// from its events.
///
/// The contract the runtime relies on:
/// - [`handle`](Aggregate::handle) holds every business rule, does no I/O and
///   is deterministic given the state and the command: on a concurrency
///   conflict the runtime catches up with the stream and calls it again with
///   the *same* command.
/// - [`apply`](Aggregate::apply) holds no rules and does not fail: an event
///   is a fact already decided. It must be deterministic, because the state
///   is rebuilt by replaying events (and from a snapshot plus the events
///   after it, which must give the same state as a full replay).
/// - `Default` is the state before the first event; the state serializes so
///   that the runtime can snapshot it. A snapshot that no longer decodes
///   after the state type changed is ignored and the state is rebuilt from
///   events.
/// - Both serializations are lossless: an event, and the state, must come
///   back equal from a round trip through postcard. The live actor applies
///   the event values it decided, while a recovering one applies what it
///   decodes from the store (and starts from a decoded snapshot), so a
///   field skipped with `#[serde(skip)]`, a float turned to text and back,
///   or a `Serialize` that drops data would make a recovered aggregate
///   differ from the one that ran. [`crate::testing::AggregateTest`] checks that
///   events decode; it cannot check that they decode to equal values
///   without `PartialEq`, so this part is the type author's to keep.
/// - `Clone` lets the runtime try the new events on a copy before storing
///   them (see [`crate::CommandError::AggregatePanicked`]) and hand out
///   states.
///
/// Besides annals, an aggregate needs only `serde` with its `derive`
/// feature (for the state and the events) and `tokio` to run the runtime.
/// The domain error is any [`std::error::Error`]: a `Display` and an empty
/// `Error` impl, a few lines by hand, as in this example (the
/// [`crate::testing::AggregateTest`] kit checks it without a store):
///
/// ```
/// use annals::{Aggregate, DomainEvent};
/// use annals::testing::AggregateTest;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// enum LoanEvent { BookLent { member: String }, BookReturned }
/// impl DomainEvent for LoanEvent {}
///
/// #[derive(Debug)]
/// enum LoanCommand { Lend { member: String }, Return }
///
/// #[derive(Debug, PartialEq)]
/// enum LoanError { AlreadyLent, NotLent }
/// impl std::fmt::Display for LoanError {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
///         f.write_str(match self {
///             LoanError::AlreadyLent => "the book is already lent",
///             LoanError::NotLent => "the book is not lent",
///         })
///     }
/// }
/// impl std::error::Error for LoanError {}
///
/// #[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// struct Book { borrower: Option<String> }
///
/// impl Aggregate for Book {
///     type Command = LoanCommand;
///     type Event = LoanEvent;
///     type Error = LoanError;
///     const CATEGORY: &'static str = "book";
///
///     fn handle(&self, command: &LoanCommand) -> Result<Vec<LoanEvent>, LoanError> {
///         match (command, &self.borrower) {
///             (LoanCommand::Lend { .. }, Some(_)) => Err(LoanError::AlreadyLent),
///             (LoanCommand::Lend { member }, None) => {
///                 Ok(vec![LoanEvent::BookLent { member: member.clone() }])
///             }
///             (LoanCommand::Return, None) => Err(LoanError::NotLent),
///             (LoanCommand::Return, Some(_)) => Ok(vec![LoanEvent::BookReturned]),
///         }
///     }
///
///     fn apply(&mut self, event: &LoanEvent) {
///         self.borrower = match event {
///             LoanEvent::BookLent { member } => Some(member.clone()),
///             LoanEvent::BookReturned => None,
///         };
///     }
/// }
///
/// AggregateTest::<Book>::given([LoanEvent::BookLent { member: "ada".into() }])
///     .when(LoanCommand::Lend { member: "bob".into() })
///     .then_expect_error(LoanError::AlreadyLent);
/// ```
pub trait Aggregate:
    Default + Clone + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// What the aggregate is asked to do (imperative: `ShipOrder`).
    type Command: Debug + Send + 'static;
    /// What happened (past tense: `OrderShipped`), stored under its variant
    /// name by [`crate::codec::encode_event`].
    type Event: DomainEvent;
    /// Why a command was refused by the domain's rules.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The stream category: an instance `42` lives in stream `CATEGORY-42`.
    /// It must be a valid stream id prefix without `-`.
    const CATEGORY: &'static str;

    /// Decides: the events that `command` causes in the current state, or
    /// the domain's refusal. An empty vector means "nothing to do" and
    /// stores nothing.
    ///
    /// # Errors
    /// The domain's refusal; nothing is stored.
    fn handle(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Evolves the state by one event. No rules, no failure.
    fn apply(&mut self, event: &Self::Event);
}
