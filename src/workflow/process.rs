//! The process-manager contract: a [`ProcessManager`] reacts to events from
//! the log and to the outcomes of its own commands and timers, deciding
//! purely ([`ProcessManager::react`]) what to send; the runtime does the
//! I/O (see `runner.rs`) and records every decision in the log.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec::{decode_event, DomainEvent};
use crate::error::{CodecError, CommandError};
use crate::event::RecordedEvent;
use crate::runtime::{Aggregate, CommandContext, Executed};

/// A workflow across aggregates (a saga): one instance per business
/// process (one order's fulfilment), each with its own state.
///
/// The contract the runtime relies on:
/// - [`instance_of`](ProcessManager::instance_of) routes an event of the
///   log to an instance (or ignores it); it is pure.
/// - [`react`](ProcessManager::react) decides, like
///   [`Aggregate::handle`]: pure and deterministic given the state and the
///   input, no I/O, no clock (ask for a timer instead). Its decision (new
///   state, commands, timers) is recorded in the log before any command is
///   sent, so a crash at any point resumes from it and never decides the
///   same input twice.
/// - [`send`](ProcessManager::send) routes one command to its aggregate
///   with the given context, unchanged: the context carries the command id
///   that makes the command run exactly once (derived from the input that
///   caused it), the instance's correlation id and the causing event as
///   causation.
///
/// The state and the commands serialize (postcard) into the instance's
/// stream `NAME-<instance>`; both round trips must be lossless.
pub trait ProcessManager: Send + Sync + 'static {
    /// Per-instance state; `Default` is the state before the first input.
    type State: Default + Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The commands it sends (typically one enum over the aggregates it
    /// drives). Their `Debug` text is their fingerprint for the command id
    /// ([`crate::runtime::command_fingerprint`]).
    type Command: Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// The workflow's name: a stream category without `-`, not used by an
    /// aggregate. Instances live in streams `NAME-<instance>`, and the
    /// position in the log in checkpoint `workflow:NAME`.
    const NAME: &'static str;

    /// The instance `event` belongs to, or `None` when the workflow does
    /// not react to it.
    fn instance_of(&self, event: &RecordedEvent) -> Option<String>;

    /// Decides what `input` means for an instance in `state`.
    fn react(
        &self,
        state: &Self::State,
        input: &Input<'_, Self::Command>,
    ) -> Reaction<Self::State, Self::Command>;

    /// Sends `command` to its aggregate with `context` (pass it unchanged).
    fn send(
        &self,
        command: Self::Command,
        context: CommandContext,
    ) -> impl Future<Output = Sent> + Send;
}

/// What a workflow instance reacts to.
#[derive(Debug)]
#[non_exhaustive]
pub enum Input<'a, C> {
    /// An event of the log that [`ProcessManager::instance_of`] routed to
    /// this instance.
    Event(&'a RecordedEvent),
    /// The domain refused one of the instance's commands
    /// ([`Sent::Refused`]): an input like any other, not a crash.
    Refused {
        /// The command.
        command: &'a C,
        /// The domain's reason.
        reason: &'a str,
    },
    /// A command kept failing for infrastructure reasons after the
    /// workflow's retries, and its policy is [`OnFailure::Compensate`]:
    /// decide the undo commands.
    Failed {
        /// The command.
        command: &'a C,
        /// The last error.
        error: &'a str,
    },
    /// A timer set by [`Reaction::wake_at`] or [`Reaction::wake_after`]
    /// fired (once).
    Timer {
        /// The timer's name.
        name: &'a str,
    },
}

impl<C> Input<'_, C> {
    /// The input's event decoded as `E`, when it is an event of type `E`
    /// (`None` for another input, or an event of another type).
    pub fn event<E: DomainEvent>(&self) -> Option<E> {
        match self {
            Input::Event(recorded) => decode_event::<E>(recorded).ok(),
            _ => None,
        }
    }

    /// As [`Input::event`], keeping the codec's error for an event that
    /// does not decode as `E`.
    ///
    /// # Errors
    /// The codec's.
    pub fn try_event<E: DomainEvent>(&self) -> Option<Result<E, CodecError>> {
        match self {
            Input::Event(recorded) => Some(decode_event::<E>(recorded)),
            _ => None,
        }
    }
}

/// When a timer should fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeAt {
    /// At this wall-clock time (one in the past fires at once).
    Time(SystemTime),
    /// This long after the reaction is recorded.
    After(Duration),
}

/// A workflow's decision on one input: the new state, the commands to send
/// (in order, each exactly once), timers to set or cancel, and whether the
/// instance is done.
#[derive(Debug, Clone)]
#[must_use]
pub struct Reaction<S, C> {
    pub(crate) state: S,
    pub(crate) commands: Vec<C>,
    pub(crate) timers: Vec<(String, WakeAt)>,
    pub(crate) cancelled: Vec<String>,
    pub(crate) complete: bool,
}

impl<S, C> Reaction<S, C> {
    /// A reaction that moves the instance to `state` and does nothing else.
    pub fn new(state: S) -> Self {
        Self {
            state,
            commands: Vec::new(),
            timers: Vec::new(),
            cancelled: Vec::new(),
            complete: false,
        }
    }

    /// Sends `command` (after the ones added before).
    pub fn send(mut self, command: C) -> Self {
        self.commands.push(command);
        self
    }

    /// Sets timer `name` to fire at `at` (replacing a pending timer of the
    /// same name). A time in the past fires at once: as soon as the
    /// reaction is recorded.
    pub fn wake_at(mut self, name: impl Into<String>, at: SystemTime) -> Self {
        self.timers.push((name.into(), WakeAt::Time(at)));
        self
    }

    /// Sets timer `name` to fire `after` the reaction is recorded.
    pub fn wake_after(mut self, name: impl Into<String>, after: Duration) -> Self {
        self.timers.push((name.into(), WakeAt::After(after)));
        self
    }

    /// Cancels the pending timer `name`, if any.
    pub fn cancel_timer(mut self, name: impl Into<String>) -> Self {
        self.cancelled.push(name.into());
        self
    }

    /// Marks the instance completed: later inputs for it are ignored and
    /// its pending timers are dropped.
    pub fn complete(mut self) -> Self {
        self.complete = true;
        self
    }

    /// The state the instance moves to.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// The commands, in sending order.
    pub fn commands(&self) -> &[C] {
        &self.commands
    }

    /// The timers set, in order.
    pub fn timers(&self) -> &[(String, WakeAt)] {
        &self.timers
    }

    /// The timers cancelled.
    pub fn cancelled_timers(&self) -> &[String] {
        &self.cancelled
    }

    /// Whether the instance is completed.
    pub fn is_complete(&self) -> bool {
        self.complete
    }
}

/// The outcome of [`ProcessManager::send`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// The command is stored (or had nothing to do, or had run before with
    /// the same command id).
    Done,
    /// The domain refused it: fed back to the workflow as
    /// [`Input::Refused`].
    Refused(String),
    /// The infrastructure failed (timeout, store, overload, ...): handled
    /// by the workflow's [`FailurePolicy`]. Retrying is safe, since the
    /// command id is the same.
    Failed(String),
}

impl<A: Aggregate> From<Result<Executed<A>, CommandError<A::Error>>> for Sent {
    fn from(result: Result<Executed<A>, CommandError<A::Error>>) -> Self {
        match result {
            Ok(_) => Sent::Done,
            Err(CommandError::Domain(reason)) => Sent::Refused(reason.to_string()),
            Err(other) => Sent::Failed(other.to_string()),
        }
    }
}

/// What the runtime does when a command keeps failing for infrastructure
/// reasons ([`Sent::Failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnFailure {
    /// Stop the instance and show it failed in
    /// [`crate::workflow::WorkflowHandle::status`]; its later inputs are
    /// ignored.
    Stop,
    /// Feed [`Input::Failed`] to the workflow, which decides the undo
    /// commands.
    Compensate,
}

/// Retries with exponential backoff, then [`OnFailure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePolicy {
    pub(crate) attempts: u32,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) then: OnFailure,
}

impl FailurePolicy {
    /// Tries a failing command up to `attempts` times (at least once),
    /// waiting `initial_backoff`, doubled after each failure up to
    /// `max_backoff`, then does `then`.
    pub fn new(
        attempts: u32,
        initial_backoff: Duration,
        max_backoff: Duration,
        then: OnFailure,
    ) -> Self {
        Self {
            attempts: attempts.max(1),
            initial_backoff,
            max_backoff,
            then,
        }
    }

    /// Never gives up: retries forever with backoff (the default: commands
    /// are idempotent, so a long outage only delays the workflow).
    pub fn retry_forever(initial_backoff: Duration, max_backoff: Duration) -> Self {
        Self::new(u32::MAX, initial_backoff, max_backoff, OnFailure::Stop)
    }
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self::retry_forever(Duration::from_millis(10), Duration::from_secs(5))
    }
}

/// What one recorded reaction holds (the payload of a `WorkflowStep` event
/// in the instance's stream).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StepRecord {
    /// The encoded state after the reaction.
    pub(crate) state: Vec<u8>,
    /// The encoded commands, in sending order.
    pub(crate) commands: Vec<Vec<u8>>,
    /// Timers set: name and due time (microseconds since the Unix epoch).
    pub(crate) timers: Vec<(String, u64)>,
    /// Timers cancelled (and the fired timer, for a timer input).
    pub(crate) cancelled: Vec<String>,
    pub(crate) status: StepStatus,
}

/// The instance's status after a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum StepStatus {
    Running,
    Completed,
    Failed(String),
}
