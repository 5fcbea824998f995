//! The given/when/then kit for process managers: given the events an
//! instance has seen, when one more input, then these commands and timers.

use crate::codec::{encode_event, DomainEvent};
use crate::event::{now_micros, Position, RecordedEvent, StreamId, Version};
use crate::workflow::{Input, ProcessManager, Reaction, WakeAt};

/// The "given" step: one workflow instance's state after the inputs given,
/// decided by [`ProcessManager::react`] with no store and no runtime.
///
/// ```
/// use annals::testing::ProcessManagerTest;
/// # use annals::workflow::{Input, ProcessManager, Reaction, Sent};
/// # use annals::{CommandContext, DomainEvent, RecordedEvent};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Serialize, Deserialize)]
/// # enum OrderEvent { Placed, Paid }
/// # impl DomainEvent for OrderEvent {}
/// # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// # enum ShipCommand { Ship }
/// # struct Shipping;
/// # impl ProcessManager for Shipping {
/// #     type State = bool;
/// #     type Command = ShipCommand;
/// #     const NAME: &'static str = "shipping";
/// #     fn instance_of(&self, e: &RecordedEvent) -> Option<String> { Some(e.stream_id.to_string()) }
/// #     fn react(&self, placed: &bool, input: &Input<'_, ShipCommand>) -> Reaction<bool, ShipCommand> {
/// #         match input.event::<OrderEvent>() {
/// #             Some(OrderEvent::Placed) => Reaction::new(true).wake_after("give-up", std::time::Duration::from_secs(60)),
/// #             Some(OrderEvent::Paid) if *placed => Reaction::new(true).send(ShipCommand::Ship).cancel_timer("give-up").complete(),
/// #             _ => Reaction::new(*placed),
/// #         }
/// #     }
/// #     async fn send(&self, _: ShipCommand, _: CommandContext) -> Sent { Sent::Done }
/// # }
/// ProcessManagerTest::new(Shipping)
///     .given("order-1", [OrderEvent::Placed])
///     .when("order-1", OrderEvent::Paid)
///     .then_expect_commands([ShipCommand::Ship])
///     .then_expect_complete();
/// ```
#[derive(Debug)]
pub struct ProcessManagerTest<P: ProcessManager> {
    manager: P,
    state: P::State,
    position: u64,
}

impl<P: ProcessManager> ProcessManagerTest<P> {
    /// A fresh instance (its state is `Default`).
    pub fn new(manager: P) -> Self {
        Self {
            manager,
            state: P::State::default(),
            position: 0,
        }
    }

    /// Starts from `state` instead of the default.
    pub fn given_state(mut self, state: P::State) -> Self {
        self.state = state;
        self
    }

    /// Feeds `events` (appended to `stream`, encoded as the runtime stores
    /// them) to the instance, one by one, keeping each reaction's state.
    ///
    /// # Panics
    /// When `stream` is not a valid stream id, an event does not encode,
    /// or [`ProcessManager::instance_of`] does not route it.
    #[track_caller]
    pub fn given<E: DomainEvent>(
        mut self,
        stream: &str,
        events: impl IntoIterator<Item = E>,
    ) -> Self {
        for event in events {
            let recorded = self.record(stream, &event);
            self.state = self.decide(&Input::Event(&recorded)).state;
        }
        self
    }

    /// Feeds a refusal of `command` to the instance, keeping the state.
    pub fn given_refused(mut self, command: P::Command, reason: &str) -> Self {
        let input = Input::Refused {
            command: &command,
            reason,
        };
        self.state = self.decide(&input).state;
        self
    }

    /// When `event` is appended to `stream`: the reaction to check.
    ///
    /// # Panics
    /// As [`ProcessManagerTest::given`].
    #[track_caller]
    pub fn when<E: DomainEvent>(mut self, stream: &str, event: E) -> ProcessManagerTestResult<P> {
        let recorded = self.record(stream, &event);
        let reaction = self.decide(&Input::Event(&recorded));
        ProcessManagerTestResult { reaction }
    }

    /// When the domain refuses `command` for `reason`.
    pub fn when_refused(self, command: P::Command, reason: &str) -> ProcessManagerTestResult<P> {
        let input = Input::Refused {
            command: &command,
            reason,
        };
        ProcessManagerTestResult {
            reaction: self.decide(&input),
        }
    }

    /// When `command` failed after the retries (policy
    /// [`crate::workflow::OnFailure::Compensate`]).
    pub fn when_failed(self, command: P::Command, error: &str) -> ProcessManagerTestResult<P> {
        let input = Input::Failed {
            command: &command,
            error,
        };
        ProcessManagerTestResult {
            reaction: self.decide(&input),
        }
    }

    /// When timer `name` fires.
    pub fn when_timer(self, name: &str) -> ProcessManagerTestResult<P> {
        ProcessManagerTestResult {
            reaction: self.decide(&Input::Timer { name }),
        }
    }

    fn decide(&self, input: &Input<'_, P::Command>) -> Reaction<P::State, P::Command> {
        self.manager.react(&self.state, input)
    }

    #[track_caller]
    fn record<E: DomainEvent>(&mut self, stream: &str, event: &E) -> RecordedEvent {
        let stream_id = match StreamId::new(stream) {
            Ok(id) => id,
            Err(e) => panic!("{stream:?} is not a stream id: {e}"),
        };
        let new = match encode_event(event) {
            Ok(new) => new,
            Err(e) => panic!("{event:?} does not encode: {e}"),
        };
        self.position += 1;
        let recorded = RecordedEvent {
            event_id: new.event_id,
            stream_id,
            version: Version(self.position),
            position: Position(self.position),
            event_type: new.event_type,
            schema_version: new.schema_version,
            recorded_at_micros: now_micros(),
            metadata: new.metadata,
            payload: new.payload,
        };
        if self.manager.instance_of(&recorded).is_none() {
            panic!(
                "workflow {} does not route {event:?} in {stream} to an instance",
                P::NAME
            );
        }
        recorded
    }
}

/// The "then" step: the reaction to the input of the "when".
#[derive(Debug)]
pub struct ProcessManagerTestResult<P: ProcessManager> {
    reaction: Reaction<P::State, P::Command>,
}

impl<P: ProcessManager> ProcessManagerTestResult<P>
where
    P::Command: PartialEq,
{
    /// Asserts the commands sent, in order.
    ///
    /// # Panics
    /// When they differ, naming both.
    #[track_caller]
    pub fn then_expect_commands(self, expected: impl IntoIterator<Item = P::Command>) -> Self {
        let expected: Vec<P::Command> = expected.into_iter().collect();
        assert!(
            self.reaction.commands() == expected.as_slice(),
            "expected commands {expected:?}, got {:?}",
            self.reaction.commands()
        );
        self
    }
}

impl<P: ProcessManager> ProcessManagerTestResult<P> {
    /// Asserts the timers set, by name and due, in order.
    ///
    /// # Panics
    /// When they differ, naming both.
    #[track_caller]
    pub fn then_expect_timers<'a>(
        self,
        expected: impl IntoIterator<Item = (&'a str, WakeAt)>,
    ) -> Self {
        let expected: Vec<(String, WakeAt)> = expected
            .into_iter()
            .map(|(n, w)| (n.to_owned(), w))
            .collect();
        assert!(
            self.reaction.timers() == expected.as_slice(),
            "expected timers {expected:?}, got {:?}",
            self.reaction.timers()
        );
        self
    }

    /// Asserts the timers cancelled, in order.
    ///
    /// # Panics
    /// When they differ, naming both.
    #[track_caller]
    pub fn then_expect_cancelled_timers<'a>(
        self,
        expected: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let expected: Vec<&str> = expected.into_iter().collect();
        let actual: Vec<&str> = self
            .reaction
            .cancelled_timers()
            .iter()
            .map(String::as_str)
            .collect();
        assert!(
            actual == expected,
            "expected cancelled timers {expected:?}, got {actual:?}"
        );
        self
    }

    /// Asserts that the reaction completes the instance.
    ///
    /// # Panics
    /// When it does not.
    #[track_caller]
    pub fn then_expect_complete(self) -> Self {
        assert!(
            self.reaction.is_complete(),
            "expected the instance to complete; it goes on"
        );
        self
    }

    /// Asserts that the reaction leaves the instance running.
    ///
    /// # Panics
    /// When it completes it.
    #[track_caller]
    pub fn then_expect_running(self) -> Self {
        assert!(
            !self.reaction.is_complete(),
            "expected the instance to go on; it completes"
        );
        self
    }

    /// The state after the reaction.
    pub fn state(&self) -> &P::State {
        self.reaction.state()
    }

    /// The whole reaction, for other checks.
    pub fn reaction(&self) -> &Reaction<P::State, P::Command> {
        &self.reaction
    }
}
