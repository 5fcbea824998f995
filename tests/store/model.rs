//! The runtime against a plain model (proptest): random command sequences
//! over a few ledgers, with restarts of the runtime (a clean shutdown, or an
//! old runtime simply abandoned with its actors still live, and commands
//! then sent through any runtime: two writers on one store), passivation
//! (a tiny idle timeout, a tiny maximum of live actors) and different
//! snapshot intervals, on the memory and the sled store. After every step
//! the reply matches the model's; at checks and at the end the states, the
//! stored events (per stream and in `$all`), the snapshots and the states
//! at every past version match the model's.
//!
//! `ANNALS_MODEL_CASES=N` runs N cases (default 24, a few seconds).

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use annals::codec::{decode_event, decode_value};
use annals::store::{
    AppendError, AppendResult, EventFilter, LiveFeed, ReadDirection, ReadError, Snapshot,
};
use annals::{
    Aggregate, CommandError, EventStore, ExpectedVersion, MemoryStore, NewEvent, Position,
    RecordedEvent, Runtime, RuntimeConfig, SledStore, StoreError, StreamId, Version,
};
use async_trait::async_trait;
use common::{Ledger, LedgerCommand as C, LedgerEvent};
use proptest::prelude::*;

const LEDGERS: usize = 4;

#[derive(Debug, Clone)]
enum Step {
    /// A command to a ledger, through one of the runtimes still running
    /// (`via` modulo their number): two runtimes over one store are two
    /// writers, each actor deciding on its own view until a conflict or a
    /// check shows it stale.
    Execute(usize, C, usize),
    /// A new runtime on the same store; `clean`: the old ones shut down
    /// first (and a sled store is closed and reopened), otherwise the old
    /// runtime is dropped with its actors still live.
    Restart { clean: bool },
    /// Time passes: with a tiny idle timeout, actors passivate.
    Idle,
    /// The state of a ledger, through one of the runtimes, equals the
    /// model's.
    Check(usize, usize),
}

#[derive(Debug, Clone)]
struct Setup {
    sled: bool,
    snapshot_every: u64,
    tiny_idle_timeout: bool,
    max_live_aggregates: usize,
}

fn command() -> impl Strategy<Value = C> {
    prop_oneof![
        3 => Just(C::Open),
        6 => (0u64..100).prop_map(C::Deposit),
        4 => (0u64..150).prop_map(C::Withdraw),
        3 => (0u64..1000).prop_map(C::Note),
        2 => (0u64..50).prop_map(C::DepositTwice),
        1 => Just(C::Nothing),
        1 => Just(C::PanicInHandle),
        1 => Just(C::EmitPoison),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        24 => (0..LEDGERS, command(), 0..4usize)
            .prop_map(|(ledger, c, via)| Step::Execute(ledger, c, via)),
        2 => any::<bool>().prop_map(|clean| Step::Restart { clean }),
        2 => Just(Step::Idle),
        2 => (0..LEDGERS, 0..4usize).prop_map(|(ledger, via)| Step::Check(ledger, via)),
    ]
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        any::<bool>(),
        prop_oneof![Just(0u64), Just(1), Just(2), Just(3), Just(5), Just(100)],
        any::<bool>(),
        prop_oneof![Just(1usize), Just(2), Just(1000)],
    )
        .prop_map(
            |(sled, snapshot_every, tiny_idle_timeout, max_live_aggregates)| Setup {
                sled,
                snapshot_every,
                tiny_idle_timeout,
                max_live_aggregates,
            },
        )
}

/// The model: per ledger the state after each of its events, and the
/// events in commit order.
#[derive(Debug, Default)]
struct Model {
    /// `states[ledger][v]`: the state at version `v`.
    states: Vec<Vec<Ledger>>,
    events: Vec<Vec<LedgerEvent>>,
    /// `$all`: (ledger, event), in commit order.
    all: Vec<(usize, LedgerEvent)>,
}

enum Expected {
    Events(Vec<LedgerEvent>),
    Refused(common::LedgerError),
    Panicked,
}

impl Model {
    fn new() -> Self {
        Self {
            states: vec![vec![Ledger::default()]; LEDGERS],
            events: vec![Vec::new(); LEDGERS],
            all: Vec::new(),
        }
    }

    fn state(&self, ledger: usize) -> &Ledger {
        self.states[ledger].last().unwrap()
    }

    fn execute(&mut self, ledger: usize, command: &C) -> Expected {
        if matches!(command, C::PanicInHandle | C::EmitPoison) {
            return Expected::Panicked;
        }
        match self.state(ledger).handle(command) {
            Err(error) => Expected::Refused(error),
            Ok(events) => {
                for event in &events {
                    let mut next = self.state(ledger).clone();
                    next.apply(event);
                    self.states[ledger].push(next);
                    self.events[ledger].push(event.clone());
                    self.all.push((ledger, event.clone()));
                }
                Expected::Events(events)
            }
        }
    }
}

/// A memory store that outlives the runtimes over it: their shutdown does
/// not close it, so the next runtime finds everything.
#[derive(Debug)]
struct KeepOpen(Arc<MemoryStore>);

#[async_trait]
impl EventStore for KeepOpen {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, AppendError> {
        self.0.append(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: Version,
        direction: ReadDirection,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.0.read_stream(stream, from, direction, limit).await
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Version, ReadError> {
        self.0.stream_version(stream).await
    }

    async fn read_all(
        &self,
        from: Position,
        direction: ReadDirection,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.0.read_all(from, direction, limit, filter).await
    }

    fn head_position(&self) -> Position {
        self.0.head_position()
    }

    fn subscribe_live(&self) -> LiveFeed {
        self.0.subscribe_live()
    }

    async fn save_snapshot(&self, stream: &StreamId, snapshot: Snapshot) -> Result<(), StoreError> {
        self.0.save_snapshot(stream, snapshot).await
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, ReadError> {
        self.0.load_snapshot(stream).await
    }

    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), StoreError> {
        self.0.delete_snapshot(stream).await
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        self.0.save_checkpoint(name, position).await
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, ReadError> {
        self.0.load_checkpoint(name).await
    }

    async fn shutdown(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The store under test and the runtimes over it (the current one last).
struct System {
    setup: Setup,
    dir: Option<tempfile::TempDir>,
    store: Arc<dyn EventStore>,
    runtimes: Vec<Runtime>,
}

impl System {
    fn new(setup: Setup) -> Self {
        let (dir, store): (_, Arc<dyn EventStore>) = if setup.sled {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(SledStore::open(dir.path()).unwrap());
            (Some(dir), store)
        } else {
            (None, Arc::new(KeepOpen(Arc::new(MemoryStore::new()))))
        };
        let mut system = Self {
            setup,
            dir,
            store,
            runtimes: Vec::new(),
        };
        system.runtimes.push(system.runtime());
        system
    }

    fn runtime(&self) -> Runtime {
        let mut config = RuntimeConfig::builder()
            .snapshot_every(self.setup.snapshot_every)
            .max_live_aggregates(self.setup.max_live_aggregates);
        if self.setup.tiny_idle_timeout {
            config = config.idle_timeout(Duration::from_millis(1));
        }
        Runtime::new(Arc::clone(&self.store), config.build().unwrap())
    }

    fn current(&self) -> &Runtime {
        self.runtimes.last().unwrap()
    }

    fn via(&self, via: usize) -> &Runtime {
        &self.runtimes[via % self.runtimes.len()]
    }

    async fn restart(&mut self, clean: bool) {
        if clean {
            for runtime in self.runtimes.drain(..) {
                runtime.shutdown().await.unwrap();
            }
            if let Some(dir) = &self.dir {
                // Every handle must be gone for sled to release its lock:
                // let go of ours before reopening.
                self.store = Arc::new(MemoryStore::new());
                self.store = Arc::new(common::reopen_sled(dir.path()).await);
            }
        }
        self.runtimes.push(self.runtime());
    }

    async fn shutdown(mut self) {
        for runtime in self.runtimes.drain(..) {
            runtime.shutdown().await.unwrap();
        }
        self.store.shutdown().await.unwrap();
    }
}

fn stream(ledger: usize) -> StreamId {
    StreamId::new(format!("ledger-{ledger}")).unwrap()
}

/// Everything the store and the runtime hold equals the model.
async fn check_all(system: &System, model: &Model) -> Result<(), TestCaseError> {
    let runtime = system.current();
    let ledgers = runtime.aggregates::<Ledger>();
    let store = &system.store;
    for ledger in 0..LEDGERS {
        let id = ledger.to_string();
        let stream = stream(ledger);
        prop_assert_eq!(&ledgers.state(&id).await.unwrap(), model.state(ledger));
        let stored: Vec<LedgerEvent> = store
            .read_stream(&stream, Version::FIRST, ReadDirection::Forward, 10_000)
            .await
            .unwrap()
            .iter()
            .map(|e| decode_event(e).unwrap())
            .collect();
        prop_assert_eq!(&stored, &model.events[ledger], "events of {}", stream);
        // Time travel: every past state, from snapshots or not.
        for (version, state) in model.states[ledger].iter().enumerate() {
            let at = ledgers
                .state_at(&id, Version(version as u64))
                .await
                .unwrap();
            prop_assert_eq!(&at, state, "{} at version {}", stream, version);
        }
        // A snapshot is the model's state at its version.
        if let Some(snapshot) = store.load_snapshot(&stream).await.unwrap() {
            let version = snapshot.version.0 as usize;
            prop_assert!(version < model.states[ledger].len());
            let decoded: Ledger = decode_value(&snapshot.payload).unwrap();
            prop_assert_eq!(&decoded, &model.states[ledger][version]);
        }
    }
    let all: Vec<(String, LedgerEvent)> = store
        .read_all(
            Position::START,
            ReadDirection::Forward,
            100_000,
            &EventFilter::All,
        )
        .await
        .unwrap()
        .iter()
        .map(|e| (e.stream_id.to_string(), decode_event(e).unwrap()))
        .collect();
    let expected: Vec<(String, LedgerEvent)> = model
        .all
        .iter()
        .map(|(ledger, event)| (stream(*ledger).to_string(), event.clone()))
        .collect();
    prop_assert_eq!(all, expected);
    Ok(())
}

async fn run(setup: Setup, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let mut system = System::new(setup);
    let mut model = Model::new();
    for step in steps {
        match step {
            Step::Execute(ledger, command, via) => {
                let expected = model.execute(ledger, &command);
                let result = system
                    .via(via)
                    .aggregates::<Ledger>()
                    .execute(&ledger.to_string(), command.clone())
                    .await;
                match (expected, result) {
                    (Expected::Events(events), Ok(executed)) => {
                        prop_assert_eq!(&executed.events, &events, "{:?}", command);
                        let version = model.events[ledger].len() as u64;
                        prop_assert_eq!(executed.version, Version(version));
                        let position =
                            (!events.is_empty()).then_some(Position(model.all.len() as u64));
                        prop_assert_eq!(executed.position, position);
                    }
                    (Expected::Refused(error), Err(CommandError::Domain(refused))) => {
                        prop_assert_eq!(refused, error);
                    }
                    (Expected::Panicked, Err(CommandError::AggregatePanicked { .. })) => {}
                    (_, result) => {
                        return Err(TestCaseError::fail(format!(
                            "{command:?} on ledger {ledger}: the runtime answered {result:?}"
                        )))
                    }
                }
            }
            Step::Restart { clean } => system.restart(clean).await,
            Step::Idle => tokio::time::sleep(Duration::from_millis(3)).await,
            Step::Check(ledger, via) => {
                let state = system
                    .via(via)
                    .aggregates::<Ledger>()
                    .state(&ledger.to_string())
                    .await
                    .unwrap();
                prop_assert_eq!(&state, model.state(ledger));
            }
        }
    }
    check_all(&system, &model).await?;
    // And once more from a cold start: recovery from snapshots plus tails.
    system.restart(true).await;
    check_all(&system, &model).await?;
    system.shutdown().await;
    Ok(())
}

fn cases() -> u32 {
    crate::common::setting("ANNALS_MODEL_CASES", 24)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    })]

    #[test]
    fn runtime_matches_the_model(
        setup in setup(),
        steps in prop::collection::vec(step(), 1..80),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(setup, steps))?;
    }
}
