//! The metrics annals records, read back through a test recorder
//! (`metrics-util`'s `DebuggingRecorder`), and `Runtime::health`.
//!
//! One global recorder serves the whole binary (the runtime records from
//! its actors' tasks, which a thread-local recorder would not see). Tests
//! run in parallel, so each one uses its own aggregate categories and
//! projection names, and only one uses the sled store (label
//! `backend="sled"`).

#[path = "../examples/fulfilment_domain/mod.rs"]
mod fulfilment_domain;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use annals::metrics as names;
use annals::projection::{FailurePolicy, ProjectionContext, ProjectionError, ProjectionState};
use annals::runtime::CategoryError;
use annals::store::WriterStatus;
use annals::testing::{FaultPlan, FaultyStore};
use annals::workflow::{EventSink, Relay, RelayConfig};
use annals::{
    Aggregate, CommandContext, CommandError, DomainEvent, EventStore, ExpectedVersion, MemoryStore,
    NewEvent, Projection, ProjectionConfig, RecordedEvent, Runtime, RuntimeConfig, SledStore,
    StreamId, Version,
};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use serde::{Deserialize, Serialize};

/// A recorder that keeps every value, built from `metrics-util`'s atomic
/// registry. (`metrics-util`'s `DebuggingRecorder` resets counters and
/// gauges on every snapshot, which tests running in parallel would see as
/// each other's resets.)
#[derive(Clone)]
struct TestRecorder(Arc<Registry<Key, AtomicStorage>>);

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0
            .get_or_create_counter(key, |c| Counter::from_arc(Arc::clone(c)))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0
            .get_or_create_gauge(key, |g| Gauge::from_arc(Arc::clone(g)))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0
            .get_or_create_histogram(key, |h| Histogram::from_arc(Arc::clone(h)))
    }
}

/// The binary's one recorder, installed before any test makes a handle.
fn recorder() -> &'static TestRecorder {
    static RECORDER: OnceLock<TestRecorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder = TestRecorder(Arc::new(Registry::atomic()));
        metrics::set_global_recorder(recorder.clone()).expect("no other recorder in this binary");
        annals::metrics::describe();
        recorder
    })
}

/// Every metric's value now.
struct Recorded {
    counters: Vec<(Key, u64)>,
    gauges: Vec<(Key, f64)>,
    histograms: Vec<(Key, Vec<f64>)>,
}

fn matches(key: &Key, name: &str, labels: &[(&str, &str)]) -> bool {
    let wanted: HashSet<(&str, &str)> = labels.iter().copied().collect();
    let have: HashSet<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
    key.name() == name && have == wanted
}

impl Recorded {
    fn take() -> Self {
        let registry = &recorder().0;
        Self {
            counters: registry
                .get_counter_handles()
                .into_iter()
                .map(|(k, c)| (k, c.load(Ordering::SeqCst)))
                .collect(),
            gauges: registry
                .get_gauge_handles()
                .into_iter()
                .map(|(k, g)| (k, f64::from_bits(g.load(Ordering::SeqCst))))
                .collect(),
            histograms: registry
                .get_histogram_handles()
                .into_iter()
                .map(|(k, h)| (k, h.data()))
                .collect(),
        }
    }

    /// A counter's value; 0 when it was never registered.
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.counters
            .iter()
            .find(|(k, _)| matches(k, name, labels))
            .map_or(0, |(_, v)| *v)
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.gauges
            .iter()
            .find(|(k, _)| matches(k, name, labels))
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("gauge {name} {labels:?} not registered"))
    }

    /// Every value the histogram recorded.
    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.histograms
            .iter()
            .find(|(k, _)| matches(k, name, labels))
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }
}

// A meter: counts up, refuses to go down past zero. Generic over its
// category so that each test has its own label.

trait Category: Send + Sync + 'static {
    const NAME: &'static str;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum MeterEvent {
    Added(u64),
    Taken(u64),
}
impl DomainEvent for MeterEvent {}

#[derive(Debug)]
enum MeterCommand {
    Add(u64),
    Take(u64),
}

#[derive(Debug, thiserror::Error)]
#[error("not enough: {0} left")]
struct NotEnough(u64);

#[derive(Debug, Serialize, Deserialize)]
struct Meter<C> {
    value: u64,
    #[serde(skip)]
    category: std::marker::PhantomData<fn() -> C>,
}

impl<C> Default for Meter<C> {
    fn default() -> Self {
        Self {
            value: 0,
            category: std::marker::PhantomData,
        }
    }
}

impl<C> Clone for Meter<C> {
    fn clone(&self) -> Self {
        Self {
            value: self.value,
            category: std::marker::PhantomData,
        }
    }
}

impl<C: Category> Aggregate for Meter<C> {
    type Command = MeterCommand;
    type Event = MeterEvent;
    type Error = NotEnough;
    const CATEGORY: &'static str = C::NAME;

    fn handle(&self, command: &MeterCommand) -> Result<Vec<MeterEvent>, NotEnough> {
        match *command {
            MeterCommand::Add(n) => Ok(vec![MeterEvent::Added(n)]),
            MeterCommand::Take(n) if n > self.value => Err(NotEnough(self.value)),
            MeterCommand::Take(n) => Ok(vec![MeterEvent::Taken(n)]),
        }
    }

    fn apply(&mut self, event: &MeterEvent) {
        match event {
            MeterEvent::Added(n) => self.value += n,
            MeterEvent::Taken(n) => self.value -= n,
        }
    }
}

macro_rules! category {
    ($type:ident, $name:literal) => {
        #[derive(Debug)]
        struct $type;
        impl Category for $type {
            const NAME: &'static str = $name;
        }
    };
}

/// Counts the events it handles; fails (every attempt) on the positions
/// listed.
struct Counting {
    seen: Arc<AtomicU64>,
    fail_at: HashSet<u64>,
}

impl Projection for Counting {
    async fn handle(
        &mut self,
        event: &RecordedEvent,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        if self.fail_at.contains(&event.position.0) {
            return Err(ProjectionError::handler(format!(
                "refused {} on purpose",
                event.position
            )));
        }
        self.seen.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn outside_event(n: u64) -> NewEvent {
    annals::codec::encode_event(&MeterEvent::Added(n)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_appends_and_a_projection_are_recorded_on_sled() {
    category!(Sled, "meteredsled");
    type M = Meter<Sled>;
    let _ = recorder();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    let config = RuntimeConfig::builder().snapshot_every(10).build().unwrap();
    let runtime = Runtime::new(Arc::clone(&store), config);
    let seen = Arc::new(AtomicU64::new(0));
    let projection = runtime
        .start_projection(
            ProjectionConfig::builder("metered-count").build().unwrap(),
            Counting {
                seen: Arc::clone(&seen),
                fail_at: HashSet::new(),
            },
        )
        .await
        .unwrap();

    // 200 committed commands from 40 tasks over 20 meters.
    let meters = runtime.aggregates::<M>();
    let mut tasks = Vec::new();
    for task in 0..40u64 {
        let meters = meters.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                let id = format!("m{}", task % 20);
                meters.execute(&id, MeterCommand::Add(1)).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // 10 refused by the domain: no meter holds 1000.
    for i in 0..10 {
        let refused = meters
            .execute(&format!("m{i}"), MeterCommand::Take(1000))
            .await;
        assert!(matches!(refused, Err(CommandError::Domain(_))));
    }
    // 3 conflicts with another writer, each retried once and committed.
    for i in 0..3 {
        let stream = StreamId::new(format!("meteredsled-m{i}")).unwrap();
        store
            .append(&stream, ExpectedVersion::Any, vec![outside_event(5)])
            .await
            .unwrap();
        meters
            .execute(&format!("m{i}"), MeterCommand::Add(1))
            .await
            .unwrap();
    }
    // 1 wrong expected version: m0 is far past version 1.
    let wrong = meters
        .execute_with(
            "m0",
            MeterCommand::Add(1),
            CommandContext::default().expecting(Version(1)),
        )
        .await;
    assert!(matches!(
        wrong,
        Err(CommandError::WrongExpectedVersion { .. })
    ));

    let head = store.head_position();
    assert_eq!(head.0, 206, "203 commands and 3 outside appends stored");
    projection
        .wait_for(head, Duration::from_secs(30))
        .await
        .unwrap();

    let health = runtime.health();
    assert!(health.is_healthy(), "{health:#?}");
    assert_eq!(health.store.writer, WriterStatus::Running);
    assert!(!health.store.last_append_failed);
    assert_eq!(health.projections.len(), 1);
    assert_eq!(health.projections[0].lag, 0);
    assert_eq!(health.max_projection_lag(), 0);
    assert_eq!(health.live_aggregates, 20);
    assert!(health.last_error.is_none(), "{:?}", health.last_error);

    let recorded = Recorded::take();
    let aggregate = (names::LABEL_AGGREGATE, "meteredsled");
    let outcome = |outcome| {
        recorded.counter(
            names::COMMANDS_TOTAL,
            &[aggregate, (names::LABEL_OUTCOME, outcome)],
        )
    };
    assert_eq!(outcome("committed"), 203);
    assert_eq!(outcome("refused"), 10);
    assert_eq!(outcome("wrong_expected_version"), 1);
    assert_eq!(outcome("conflict"), 0);
    assert_eq!(outcome("error"), 0);
    let latencies = recorded.histogram(names::COMMAND_DURATION_SECONDS, &[aggregate]);
    assert_eq!(latencies.len(), 214, "one latency per command");
    assert!(latencies.iter().all(|&s| s > 0.0 && s < 60.0));
    assert_eq!(
        recorded.counter(
            names::COMMAND_RETRIES_TOTAL,
            &[aggregate, (names::LABEL_REASON, "conflict")]
        ),
        3
    );
    assert_eq!(recorded.gauge(names::AGGREGATES_LIVE, &[aggregate]), 20.0);
    assert_eq!(
        recorded.counter(names::AGGREGATE_RECOVERIES_TOTAL, &[aggregate]),
        20
    );
    let replays = recorded.histogram(names::AGGREGATE_RECOVERY_EVENTS, &[aggregate]);
    assert_eq!(replays, vec![0.0; 20], "every meter started empty");

    let backend = (names::LABEL_BACKEND, "sled");
    assert_eq!(
        recorded.counter(names::STORE_APPENDS_TOTAL, &[backend]),
        206
    );
    assert_eq!(recorded.counter(names::STORE_EVENTS_TOTAL, &[backend]), 206);
    let groups = recorded.histogram(names::STORE_GROUP_COMMIT_APPENDS, &[backend]);
    assert!(!groups.is_empty(), "group commits recorded");
    assert_eq!(groups.iter().sum::<f64>(), 206.0, "every append in a group");
    assert_eq!(
        recorded.counter(names::STORE_GROUP_COMMITS_TOTAL, &[backend]),
        groups.len() as u64
    );
    assert!(!recorded
        .histogram(names::STORE_SYNC_SECONDS, &[backend])
        .is_empty());

    let name = (names::LABEL_PROJECTION, "metered-count");
    assert_eq!(recorded.gauge(names::PROJECTION_POSITION, &[name]), 206.0);
    assert_eq!(recorded.gauge(names::PROJECTION_LAG_EVENTS, &[name]), 0.0);
    assert_eq!(
        recorded.counter(names::PROJECTION_EVENTS_TOTAL, &[name]),
        seen.load(Ordering::SeqCst)
    );
    assert_eq!(seen.load(Ordering::SeqCst), 206);

    runtime.shutdown().await.unwrap();
    let after = Recorded::take();
    assert_eq!(after.gauge(names::AGGREGATES_LIVE, &[aggregate]), 0.0);
    assert!(
        after.counter(
            names::SNAPSHOTS_TOTAL,
            &[aggregate, (names::LABEL_OUTCOME, "saved")]
        ) >= 1,
        "meters of 10 events and more were snapshotted"
    );
    assert_eq!(
        after.counter(names::AGGREGATE_PASSIVATIONS_TOTAL, &[aggregate]),
        0,
        "shutdown is not passivation"
    );
    let health = runtime.health();
    assert!(!health.is_healthy());
    assert!(health.shut_down);
    assert_eq!(health.store.writer, WriterStatus::Closed);
}

#[tokio::test]
async fn exhausted_conflicts_and_failed_appends_are_recorded_and_in_the_health() {
    category!(Faulty, "meteredfaulty");
    type M = Meter<Faulty>;
    let _ = recorder();
    let memory: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let mut plan = FaultPlan::none();
    plan.append_rejected = 1.0;
    let faulty = Arc::new(FaultyStore::new(Arc::clone(&memory), plan));
    faulty.heal();
    let runtime = Runtime::new(Arc::clone(&faulty), RuntimeConfig::default());
    let meters = runtime.aggregates::<M>();
    meters.execute("a", MeterCommand::Add(1)).await.unwrap();

    faulty.break_again();
    for _ in 0..4 {
        let failed = meters.execute("a", MeterCommand::Add(1)).await;
        assert!(matches!(failed, Err(CommandError::Store(_))), "{failed:?}");
    }
    let health = runtime.health();
    assert!(health.store.last_append_failed);
    assert_eq!(health.store.failed_appends, 4);
    assert!(!health.is_healthy());
    assert!(health.last_error.is_some());

    faulty.heal();
    meters.execute("a", MeterCommand::Add(1)).await.unwrap();
    let health = runtime.health();
    assert!(
        !health.store.last_append_failed,
        "the next append cleared it"
    );
    assert!(health.is_healthy(), "{health:#?}");
    assert_eq!(health.store.failed_appends, 4, "the count stays");

    // A stream that another writer moves before every append: the command
    // is retried up to the limit, then reported as a conflict.
    let interfering = Arc::new(Interfering {
        inner: MemoryStore::new(),
        gate: None,
        appends: AtomicU64::new(0),
    });
    let contested = Runtime::new(interfering, RuntimeConfig::default());
    category!(Contested, "meteredcontested");
    let contested_meters = contested.aggregates::<Meter<Contested>>();
    let conflict = contested_meters.execute("c", MeterCommand::Add(1)).await;
    assert!(
        matches!(conflict, Err(CommandError::Conflict { .. })),
        "{conflict:?}"
    );

    let recorded = Recorded::take();
    let faulty_label = (names::LABEL_AGGREGATE, "meteredfaulty");
    let outcome = |labels: (&str, &str), outcome| {
        recorded.counter(
            names::COMMANDS_TOTAL,
            &[labels, (names::LABEL_OUTCOME, outcome)],
        )
    };
    assert_eq!(outcome(faulty_label, "committed"), 2);
    assert_eq!(outcome(faulty_label, "error"), 4);
    let contested_label = (names::LABEL_AGGREGATE, "meteredcontested");
    assert_eq!(outcome(contested_label, "conflict"), 1);
    assert_eq!(outcome(contested_label, "committed"), 0);
    assert_eq!(
        recorded.counter(
            names::COMMAND_RETRIES_TOTAL,
            &[contested_label, (names::LABEL_REASON, "conflict")]
        ),
        u64::from(RuntimeConfig::default().max_conflict_retries())
    );
    runtime.shutdown().await.unwrap();
    contested.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refused_aggregate_type_counts_as_invalid() {
    category!(Bad, "metered-bad");
    let _ = recorder();
    let runtime = Runtime::new(Arc::new(MemoryStore::new()), RuntimeConfig::default());
    let meters = runtime.aggregates::<Meter<Bad>>();
    let refused = meters.execute("x", MeterCommand::Add(1)).await;
    assert!(matches!(
        refused,
        Err(CommandError::Category(
            CategoryError::ContainsSeparator { .. }
        ))
    ));
    let recorded = Recorded::take();
    assert_eq!(
        recorded.counter(
            names::COMMANDS_TOTAL,
            &[
                (names::LABEL_AGGREGATE, "metered-bad"),
                (names::LABEL_OUTCOME, "invalid")
            ]
        ),
        1
    );
    runtime.shutdown().await.unwrap();
}

/// Waits (no time bound on the result) until the one actor of `label`'s
/// type was passivated and dropped.
async fn passivated(label: (&str, &str)) {
    for round in 0.. {
        assert!(round < 6_000, "the idle actor was never passivated");
        let recorded = Recorded::take();
        if recorded.counter(names::AGGREGATE_PASSIVATIONS_TOTAL, &[label]) == 1
            && recorded.gauge(names::AGGREGATES_LIVE, &[label]) == 0.0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn passivation_and_recovery_with_its_replay_length() {
    category!(Idle, "meteredidle");
    type M = Meter<Idle>;
    let _ = recorder();
    // No warm idle state: the second command must recover from the store.
    let config = RuntimeConfig::builder()
        .idle_timeout(Duration::from_millis(20))
        .snapshot_every(0)
        .max_idle_aggregates(0)
        .build()
        .unwrap();
    let runtime = Runtime::new(Arc::new(MemoryStore::new()), config);
    let meters = runtime.aggregates::<M>();
    for _ in 0..7 {
        meters.execute("i", MeterCommand::Add(2)).await.unwrap();
    }
    let label = (names::LABEL_AGGREGATE, "meteredidle");
    assert_eq!(
        Recorded::take().histogram(names::AGGREGATE_RECOVERY_EVENTS, &[label]),
        vec![0.0],
        "the first recovery found no event"
    );
    passivated(label).await;
    assert!(!meters.is_live("i"));
    assert_eq!(meters.state("i").await.unwrap().value, 14);
    let recorded = Recorded::take();
    assert_eq!(
        recorded.histogram(names::AGGREGATE_RECOVERY_EVENTS, &[label]),
        vec![0.0, 7.0],
        "the second recovery replayed the 7 events (no snapshot)"
    );
    assert_eq!(
        recorded.counter(names::AGGREGATE_RECOVERIES_TOTAL, &[label]),
        2
    );
    runtime.shutdown().await.unwrap();
}

/// An actor started from a warm idle state (no store read) counts as live
/// like a recovered one, and its start is not a recovery.
#[tokio::test]
async fn an_actor_started_from_a_warm_state_counts_as_live() {
    category!(Warm, "meteredwarm");
    type M = Meter<Warm>;
    let _ = recorder();
    let config = RuntimeConfig::builder()
        .idle_timeout(Duration::from_millis(20))
        .snapshot_every(0)
        .build()
        .unwrap();
    let runtime = Runtime::new(Arc::new(MemoryStore::new()), config);
    let meters = runtime.aggregates::<M>();
    meters.execute("w", MeterCommand::Add(3)).await.unwrap();
    let label = (names::LABEL_AGGREGATE, "meteredwarm");
    passivated(label).await;
    // The next command starts the actor again from the warm state.
    meters.execute("w", MeterCommand::Add(3)).await.unwrap();
    assert!(meters.is_live("w"));
    let recorded = Recorded::take();
    assert_eq!(recorded.gauge(names::AGGREGATES_LIVE, &[label]), 1.0);
    assert_eq!(
        recorded.counter(names::AGGREGATE_RECOVERIES_TOTAL, &[label]),
        1,
        "only the first start read the store"
    );
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn projection_failures_and_skips_are_counted() {
    let _ = recorder();
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let runtime = Runtime::new(Arc::clone(&store), RuntimeConfig::default());
    let seen = Arc::new(AtomicU64::new(0));
    let config = ProjectionConfig::builder("metered-skips")
        .failure_policy(FailurePolicy::SkipAndRecord)
        .build()
        .unwrap();
    let projection = runtime
        .start_projection(
            config,
            Counting {
                seen: Arc::clone(&seen),
                fail_at: [3, 7, 8].into_iter().collect(),
            },
        )
        .await
        .unwrap();
    let stream = StreamId::new("skips-1").unwrap();
    let mut last = None;
    for n in 0..10 {
        last = Some(
            store
                .append(&stream, ExpectedVersion::Any, vec![outside_event(n)])
                .await
                .unwrap()
                .last_position,
        );
    }
    projection
        .wait_for(last.unwrap(), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(projection.status().state, ProjectionState::Running);
    let recorded = Recorded::take();
    let name = (names::LABEL_PROJECTION, "metered-skips");
    assert_eq!(recorded.counter(names::PROJECTION_SKIPS_TOTAL, &[name]), 3);
    assert_eq!(
        recorded.counter(names::PROJECTION_FAILURES_TOTAL, &[name]),
        3
    );
    assert_eq!(recorded.counter(names::PROJECTION_EVENTS_TOTAL, &[name]), 7);
    assert_eq!(recorded.gauge(names::PROJECTION_LAG_EVENTS, &[name]), 0.0);
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn overloaded_and_timed_out_commands_are_counted() {
    category!(Busy, "meteredbusy");
    let _ = recorder();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let store = Arc::new(Interfering {
        inner: MemoryStore::new(),
        gate: Some(Arc::clone(&gate)),
        appends: AtomicU64::new(0),
    });
    let config = RuntimeConfig::builder()
        .max_pending_commands(1)
        .command_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let runtime = Runtime::new(Arc::clone(&store), config);
    let meters = runtime.aggregates::<Meter<Busy>>();
    // The first command holds the meter's only pending place, stuck in
    // its append behind the closed gate.
    let first = {
        let meters = meters.clone();
        tokio::spawn(async move { meters.execute("b", MeterCommand::Add(1)).await })
    };
    while store.appends.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let second = meters.execute("b", MeterCommand::Add(1)).await;
    assert!(
        matches!(second, Err(CommandError::Overloaded { .. })),
        "{second:?}"
    );
    let first = first.await.unwrap();
    assert!(
        matches!(first, Err(CommandError::Timeout { .. })),
        "{first:?}"
    );
    gate.add_permits(1_000);
    runtime.shutdown().await.unwrap();

    let recorded = Recorded::take();
    let outcome = |outcome| {
        recorded.counter(
            names::COMMANDS_TOTAL,
            &[
                (names::LABEL_AGGREGATE, "meteredbusy"),
                (names::LABEL_OUTCOME, outcome),
            ],
        )
    };
    assert_eq!(outcome("overloaded"), 1);
    assert_eq!(outcome("timeout"), 1);
    assert_eq!(outcome("committed"), 0);
}

/// A sink that keeps what it was given.
struct Collect(Arc<AtomicU64>);

impl EventSink for Collect {
    type Error = std::io::Error;

    async fn publish(&mut self, events: &[RecordedEvent]) -> Result<(), std::io::Error> {
        self.0.fetch_add(events.len() as u64, Ordering::SeqCst);
        Ok(())
    }
}

/// A memory store holding 25 events of `stream`, for a relay to publish.
async fn store_of_25(stream: &str) -> Arc<dyn EventStore> {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let stream = StreamId::new(stream).unwrap();
    for n in 0..25 {
        store
            .append(&stream, ExpectedVersion::Any, vec![outside_event(n)])
            .await
            .unwrap();
    }
    store
}

#[tokio::test]
async fn relay_progress_and_lag_are_recorded() {
    let _ = recorder();
    let store = store_of_25("relayed-1").await;
    let published = Arc::new(AtomicU64::new(0));
    let relay = Relay::start(
        Arc::clone(&store),
        RelayConfig::new("metered-relay").batch_size(10),
        Collect(Arc::clone(&published)),
    )
    .await
    .unwrap();
    relay.wait_for(store.head_position()).await.unwrap();
    let recorded = Recorded::take();
    let name = (names::LABEL_RELAY, "metered-relay");
    assert_eq!(recorded.counter(names::RELAY_EVENTS_TOTAL, &[name]), 25);
    assert_eq!(published.load(Ordering::SeqCst), 25);
    assert_eq!(recorded.gauge(names::RELAY_POSITION, &[name]), 25.0);
    assert_eq!(recorded.gauge(names::RELAY_LAG_EVENTS, &[name]), 0.0);
    relay.shutdown().await.unwrap();
    store.shutdown().await.unwrap();
}

/// A broker that is down: every publish fails.
struct Down;

impl EventSink for Down {
    type Error = std::io::Error;

    async fn publish(&mut self, _: &[RecordedEvent]) -> Result<(), std::io::Error> {
        Err(std::io::Error::other("the broker is down"))
    }
}

/// While the broker is down the relay's lag gauge shows how far behind it
/// is (not the last value from before the outage), and failures count.
#[tokio::test]
async fn relay_lag_is_recorded_while_the_broker_is_down() {
    let _ = recorder();
    let store = store_of_25("unrelayed-1").await;
    let relay = Relay::start(
        Arc::clone(&store),
        RelayConfig::new("down-relay")
            .batch_size(10)
            .retry_backoff(Duration::from_millis(1), Duration::from_millis(5))
            .shutdown_timeout(Duration::from_millis(50)),
        Down,
    )
    .await
    .unwrap();
    let name = (names::LABEL_RELAY, "down-relay");
    let mut rounds = 0;
    let recorded = loop {
        rounds += 1;
        assert!(rounds < 6_000, "the relay never reported a failed publish");
        let recorded = Recorded::take();
        if recorded.counter(names::RELAY_FAILURES_TOTAL, &[name]) >= 1 {
            break recorded;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(recorded.gauge(names::RELAY_LAG_EVENTS, &[name]), 25.0);
    assert_eq!(recorded.counter(names::RELAY_EVENTS_TOTAL, &[name]), 0);
    assert!(
        relay.shutdown().await.is_err(),
        "nothing could be published"
    );
    store.shutdown().await.unwrap();
}

/// A memory store where another writer appends to the stream just before
/// every append, so that every append conflicts; or, with a gate, where
/// every append first waits for a permit.
#[derive(Debug)]
struct Interfering {
    inner: MemoryStore,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    appends: AtomicU64,
}

#[async_trait::async_trait]
impl EventStore for Interfering {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<annals::store::AppendResult, annals::store::AppendError> {
        self.appends.fetch_add(1, Ordering::SeqCst);
        match &self.gate {
            Some(gate) => gate.acquire().await.unwrap().forget(),
            None => {
                self.inner
                    .append(stream, ExpectedVersion::Any, vec![outside_event(1)])
                    .await?;
            }
        }
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: Version,
        direction: annals::store::ReadDirection,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, annals::store::ReadError> {
        self.inner.read_stream(stream, from, direction, limit).await
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Version, annals::store::ReadError> {
        self.inner.stream_version(stream).await
    }

    async fn read_all(
        &self,
        from: annals::Position,
        direction: annals::store::ReadDirection,
        limit: usize,
        filter: &annals::store::EventFilter,
    ) -> Result<Vec<RecordedEvent>, annals::store::ReadError> {
        self.inner.read_all(from, direction, limit, filter).await
    }

    fn head_position(&self) -> annals::Position {
        self.inner.head_position()
    }

    fn subscribe_live(&self) -> annals::store::LiveFeed {
        self.inner.subscribe_live()
    }

    async fn save_snapshot(
        &self,
        stream: &StreamId,
        snapshot: annals::store::Snapshot,
    ) -> Result<(), annals::StoreError> {
        self.inner.save_snapshot(stream, snapshot).await
    }

    async fn load_snapshot(
        &self,
        stream: &StreamId,
    ) -> Result<Option<annals::store::Snapshot>, annals::store::ReadError> {
        self.inner.load_snapshot(stream).await
    }

    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), annals::StoreError> {
        self.inner.delete_snapshot(stream).await
    }

    async fn save_checkpoint(
        &self,
        name: &str,
        position: annals::Position,
    ) -> Result<(), annals::StoreError> {
        self.inner.save_checkpoint(name, position).await
    }

    async fn load_checkpoint(
        &self,
        name: &str,
    ) -> Result<Option<annals::Position>, annals::store::ReadError> {
        self.inner.load_checkpoint(name).await
    }

    async fn shutdown(&self) -> Result<(), annals::StoreError> {
        self.inner.shutdown().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_manager_events_commands_and_instances_are_recorded() {
    use annals::workflow::WorkflowConfig;
    use fulfilment_domain::{order_of, Fulfil, Order, Stock, StockCommand};
    let _ = recorder();
    let runtime = Runtime::new(Arc::new(MemoryStore::new()), RuntimeConfig::default());
    let stock = runtime.aggregates::<Stock>();
    for sku in 0..5 {
        let restock = StockCommand::Restock { quantity: 20 };
        stock.execute(&format!("s{sku}"), restock).await.unwrap();
    }
    let workflow = runtime
        .start_workflow(
            Fulfil::new(&runtime, Duration::from_millis(100)),
            WorkflowConfig::default(),
        )
        .await
        .unwrap();
    let orders = runtime.aggregates::<Order>();
    for n in 0..40 {
        let (id, place) = order_of(n, 5);
        orders.execute(&id, place).await.unwrap();
    }
    // Waits (no time bound on the result) for every instance to end.
    for round in 0.. {
        assert!(round < 12_000, "the workflow never settled");
        let status = workflow.status();
        if status.running == 0 && status.completed >= 40 && status.pending_timers == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let name = workflow.name().to_owned();
    let process = (names::LABEL_PROCESS, name.as_str());
    let recorded = Recorded::take();
    let events = recorded.counter(names::PROCESS_EVENTS_TOTAL, &[process]);
    assert!(
        events >= 40,
        "at least each placed order was handled: {events}"
    );
    let outcome = |outcome| {
        recorded.counter(
            names::PROCESS_COMMANDS_TOTAL,
            &[process, (names::LABEL_OUTCOME, outcome)],
        )
    };
    assert!(
        outcome("committed") >= 40,
        "commands sent: {}",
        outcome("committed")
    );
    assert_eq!(outcome("error"), 0);
    // Set before each status is published: the status seen above (nothing
    // runs, no timer waits) was already in the gauges.
    assert_eq!(recorded.gauge(names::PROCESS_INSTANCES, &[process]), 0.0);
    assert_eq!(
        recorded.gauge(names::PROCESS_TIMERS_PENDING, &[process]),
        0.0
    );
    runtime.shutdown().await.unwrap();
}
