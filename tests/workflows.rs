//! Process managers on the runtime: the fulfilment workflow end to end,
//! durable timers (tokio's paused clock, a timer in the past, timers that
//! survive a restart and fire once), the failure policies, refusals as
//! inputs, bad input (unknown and invalid workflow names), and the
//! given/when/then kit.

#[path = "../examples/fulfilment_domain/mod.rs"]
mod fulfilment_domain;
// A fired timer's step re-sent after a restart; its own file, one binary.
#[path = "workflow/resume.rs"]
mod resume;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use annals::testing::ProcessManagerTest;
use annals::workflow::{
    FailurePolicy, Input, OnFailure, ProcessManager, Reaction, Sent, WakeAt, WorkflowConfig,
    WorkflowError,
};
use annals::{CommandContext, EventStore, MemoryStore, RecordedEvent, Runtime, RuntimeConfig};
use fulfilment_domain::{
    check, order_of, Fulfil, Fulfilment, Order, OrderCommand, OrderEvent, Stage, Step, Stock,
    StockCommand, StockEvent,
};
use serde::{Deserialize, Serialize};

fn memory_runtime() -> Runtime {
    Runtime::new(Arc::new(MemoryStore::new()), RuntimeConfig::default())
}

async fn restock(runtime: &Runtime, skus: u64, quantity: u32) {
    let stock = runtime.aggregates::<Stock>();
    for sku in 0..skus {
        let command = StockCommand::Restock { quantity };
        stock.execute(&format!("s{sku}"), command).await.unwrap();
    }
}

async fn all_events(store: &dyn EventStore) -> Vec<RecordedEvent> {
    let filter = annals::store::EventFilter::All;
    let forward = annals::store::ReadDirection::Forward;
    store
        .read_all(annals::Position(1), forward, usize::MAX, &filter)
        .await
        .unwrap()
}

/// Waits until the workflow has handled the log and no instance runs.
async fn settle<S: ?Sized + annals::runtime::RuntimeStore>(
    runtime: &Runtime<S>,
    name: &str,
    instances: usize,
) {
    let workflow = runtime.workflow(name).unwrap();
    loop {
        let status = workflow
            .wait_for(runtime.store().head_position(), Duration::from_secs(30))
            .await
            .unwrap();
        if status.running == 0 && status.completed >= instances {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_orders_end_consistent_on_memory() {
    let runtime = memory_runtime();
    restock(&runtime, 5, 60).await;
    let fulfil = Fulfil::new(&runtime, Duration::from_millis(200));
    runtime
        .start_workflow(fulfil, WorkflowConfig::default())
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..16u64 {
        let orders = runtime.aggregates::<Order>();
        tasks.spawn(async move {
            for n in (task..300).step_by(16) {
                let (id, place) = order_of(n, 5);
                orders.execute(&id, place).await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    settle(&runtime, "fulfilment", 300).await;
    let checked = check(&**runtime.store()).await;
    assert_eq!(checked.orders, 300);
    assert_eq!(
        (
            checked.duplicate_commands,
            checked.lost_steps,
            checked.inconsistent
        ),
        (0, 0, 0),
        "{checked:?}"
    );
    // Every path ran: shipped, declined, out of stock, unpaid.
    assert!(checked.shipped > 0 && checked.cancelled > 0, "{checked:?}");
    // Every command carries the instance's correlation id and the causing
    // event as causation.
    let events = all_events(&**runtime.store()).await;
    let ship = events
        .iter()
        .find(|e| e.event_type == "Shipped")
        .expect("an order shipped");
    let cause = events
        .iter()
        .find(|e| Some(e.event_id) == ship.metadata.causation_id)
        .expect("the causing event is in the log");
    assert_eq!(cause.event_type, "Taken");
    assert!(ship.metadata.correlation_id.is_some());
    runtime.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_unpaid_order_is_cancelled_when_its_timer_fires_on_the_paused_clock() {
    let runtime = memory_runtime();
    restock(&runtime, 1, 10).await;
    let fulfil = Fulfil::new(&runtime, Duration::from_secs(30 * 60));
    let workflow = runtime
        .start_workflow(fulfil, WorkflowConfig::default())
        .await
        .unwrap();
    let orders = runtime.aggregates::<Order>();
    let (_, place) = order_of(5, 1); // by bank transfer: never paid here
    orders.execute("late", place).await.unwrap();
    let status = workflow
        .wait_for(runtime.store().head_position(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(status.pending_timers, 1);
    // 29 minutes: not yet.
    tokio::time::sleep(Duration::from_secs(29 * 60)).await;
    let state = orders.state("late").await.unwrap();
    assert!(!state.cancelled, "cancelled before its timeout");
    // Past 30 minutes: cancelled, once.
    tokio::time::sleep(Duration::from_secs(61)).await;
    settle(&runtime, "fulfilment", 1).await;
    assert!(orders.state("late").await.unwrap().cancelled);
    let stock = runtime.aggregates::<Stock>().state("s0").await.unwrap();
    assert_eq!(stock.available, 10, "the reserved stock was released");
    assert_eq!(workflow.status().pending_timers, 0);
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn timers_survive_a_restart_and_fire_once() {
    let dir = tempfile::tempdir().unwrap();
    // Long enough that the first run is shut down well before they fire.
    let timeout = Duration::from_secs(3);
    {
        let runtime = Runtime::open(dir.path()).unwrap();
        let stock = runtime.aggregates::<Stock>();
        stock
            .execute("s0", StockCommand::Restock { quantity: 10 })
            .await
            .unwrap();
        let workflow = runtime
            .start_workflow(Fulfil::new(&runtime, timeout), WorkflowConfig::default())
            .await
            .unwrap();
        for n in [5, 10, 15] {
            let (_, place) = order_of(n, 1);
            runtime
                .aggregates::<Order>()
                .execute(&format!("t{n}"), place)
                .await
                .unwrap();
        }
        let status = workflow
            .wait_for(runtime.store().head_position(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(status.pending_timers, 3, "{status:?}");
        // Shut down before the timers are due.
        runtime.shutdown().await.unwrap();
    }
    let runtime = Runtime::open(dir.path()).unwrap();
    let workflow = runtime
        .start_workflow(Fulfil::new(&runtime, timeout), WorkflowConfig::default())
        .await
        .unwrap();
    assert_eq!(workflow.status().pending_timers, 3, "loaded from the log");
    settle(&runtime, "fulfilment", 3).await;
    let events = all_events(&**runtime.store()).await;
    let count = |kind: &str| events.iter().filter(|e| e.event_type == kind).count();
    assert_eq!(count("Voided"), 3, "each timer fired once");
    assert_eq!(count("Cancelled"), 3);
    assert_eq!(count("Released"), 3);
    runtime.shutdown().await.unwrap();
}

// ------------------------------------------------- a small workflow to probe

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Probe {
    Do(u32),
    Undo(u32),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Seen {
    inputs: Vec<String>,
}

/// Reacts to every `order` event with `Do(n)`; a timer in the past for
/// `Placed`; remembers every input; `Undo` after a failure or refusal.
struct Prober {
    /// `send` answers `Refused`, `Failed` or `Done` for `Do`, by this.
    answer: fn(u32) -> Sent,
    sent: Arc<std::sync::Mutex<Vec<Probe>>>,
    attempts: Arc<AtomicU32>,
}

impl ProcessManager for Prober {
    type State = Seen;
    type Command = Probe;
    const NAME: &'static str = "prober";

    fn instance_of(&self, event: &RecordedEvent) -> Option<String> {
        (event.stream_id.category() == "order").then(|| "one".to_owned())
    }

    fn react(&self, state: &Seen, input: &Input<'_, Probe>) -> Reaction<Seen, Probe> {
        let mut next = state.clone();
        match input {
            Input::Event(event) => {
                next.inputs.push(format!("event {}", event.event_type));
                let n = next.inputs.len() as u32;
                let reaction = Reaction::new(next).send(Probe::Do(n));
                if event.event_type == "Placed" {
                    reaction.wake_at("past", SystemTime::UNIX_EPOCH)
                } else {
                    reaction
                }
            }
            Input::Refused { command, reason } => {
                next.inputs.push(format!("refused {command:?}: {reason}"));
                Reaction::new(next).send(Probe::Undo(0))
            }
            Input::Failed { command, .. } => {
                next.inputs.push(format!("failed {command:?}"));
                Reaction::new(next).send(Probe::Undo(1))
            }
            Input::Timer { name } => {
                next.inputs.push(format!("timer {name}"));
                Reaction::new(next)
            }
            _ => Reaction::new(next),
        }
    }

    async fn send(&self, command: Probe, context: CommandContext) -> Sent {
        assert!(context.command_id.is_some() && context.causation_id.is_some());
        self.attempts.fetch_add(1, Ordering::SeqCst);
        self.sent.lock().unwrap().push(command.clone());
        match command {
            Probe::Do(n) => (self.answer)(n),
            Probe::Undo(_) => Sent::Done,
        }
    }
}

fn prober(answer: fn(u32) -> Sent) -> (Prober, Arc<std::sync::Mutex<Vec<Probe>>>, Arc<AtomicU32>) {
    let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
    let attempts = Arc::new(AtomicU32::new(0));
    let prober = Prober {
        answer,
        sent: Arc::clone(&sent),
        attempts: Arc::clone(&attempts),
    };
    (prober, sent, attempts)
}

async fn place_one(runtime: &Runtime) {
    let (_, place) = order_of(1, 1);
    runtime
        .aggregates::<Order>()
        .execute("p", place)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_refusal_is_an_input_and_a_timer_in_the_past_fires_at_once() {
    let runtime = memory_runtime();
    let (probe, sent, _) = prober(|_| Sent::Refused("no".to_owned()));
    let workflow = runtime
        .start_workflow(probe, WorkflowConfig::default())
        .await
        .unwrap();
    place_one(&runtime).await;
    workflow
        .wait_for(runtime.store().head_position(), Duration::from_secs(5))
        .await
        .unwrap();
    // The timer in the past fires without any time passing.
    for _ in 0..30_000 {
        if workflow.status().pending_timers == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(workflow.status().pending_timers, 0, "the past timer fired");
    assert_eq!(*sent.lock().unwrap(), vec![Probe::Do(1), Probe::Undo(0)]);
    let steps = instance_steps(&**runtime.store(), "prober-one").await;
    assert_eq!(
        steps, 3,
        "the event, the refusal and the timer are recorded"
    );
    runtime.shutdown().await.unwrap();
}

async fn instance_steps(store: &dyn EventStore, stream: &str) -> u64 {
    store
        .stream_version(&annals::StreamId::new(stream).unwrap())
        .await
        .unwrap()
        .0
}

#[tokio::test]
async fn failures_retry_with_backoff_then_stop_and_show_the_instance_failed() {
    let runtime = memory_runtime();
    let (probe, _, attempts) = prober(|_| Sent::Failed("store down".to_owned()));
    let policy = FailurePolicy::new(
        3,
        Duration::from_millis(1),
        Duration::from_millis(4),
        OnFailure::Stop,
    );
    let workflow = runtime
        .start_workflow(probe, WorkflowConfig::default().failure_policy(policy))
        .await
        .unwrap();
    place_one(&runtime).await;
    workflow
        .wait_for(runtime.store().head_position(), Duration::from_secs(5))
        .await
        .unwrap();
    let status = workflow.status();
    assert_eq!(
        status.failed,
        vec![("one".to_owned(), "store down".to_owned())]
    );
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        3,
        "three attempts, then stop"
    );
    // Later inputs for a failed instance are ignored.
    runtime
        .aggregates::<Order>()
        .execute("p", OrderCommand::Cancel { reason: "x".into() })
        .await
        .unwrap();
    workflow
        .wait_for(runtime.store().head_position(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn failures_can_compensate_instead() {
    let runtime = memory_runtime();
    let (probe, sent, _) = prober(|_| Sent::Failed("timeout".to_owned()));
    let policy = FailurePolicy::new(
        2,
        Duration::from_millis(1),
        Duration::from_millis(1),
        OnFailure::Compensate,
    );
    let workflow = runtime
        .start_workflow(probe, WorkflowConfig::default().failure_policy(policy))
        .await
        .unwrap();
    place_one(&runtime).await;
    workflow
        .wait_for(runtime.store().head_position(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        *sent.lock().unwrap(),
        vec![Probe::Do(1), Probe::Do(1), Probe::Undo(1)]
    );
    assert!(workflow.status().failed.is_empty());
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_invalid_and_duplicate_workflow_names_are_typed_errors() {
    let runtime = memory_runtime();
    assert!(matches!(
        runtime.workflow("nope"),
        Err(WorkflowError::Unknown { name }) if name == "nope"
    ));
    struct Dashed;
    impl ProcessManager for Dashed {
        type State = ();
        type Command = ();
        const NAME: &'static str = "has-dash";
        fn instance_of(&self, _: &RecordedEvent) -> Option<String> {
            None
        }
        fn react(&self, (): &(), _: &Input<'_, ()>) -> Reaction<(), ()> {
            Reaction::new(())
        }
        async fn send(&self, (): (), _: CommandContext) -> Sent {
            Sent::Done
        }
    }
    assert!(matches!(
        runtime
            .start_workflow(Dashed, WorkflowConfig::default())
            .await,
        Err(WorkflowError::InvalidName { .. })
    ));
    let (first, _, _) = prober(|_| Sent::Done);
    let (second, _, _) = prober(|_| Sent::Done);
    runtime
        .start_workflow(first, WorkflowConfig::default())
        .await
        .unwrap();
    assert!(matches!(
        runtime
            .start_workflow(second, WorkflowConfig::default())
            .await,
        Err(WorkflowError::AlreadyRunning { .. })
    ));
    assert_eq!(runtime.workflow("prober").unwrap().name(), "prober");
    runtime.shutdown().await.unwrap();
    let (third, _, _) = prober(|_| Sent::Done);
    assert!(matches!(
        runtime
            .start_workflow(third, WorkflowConfig::default())
            .await,
        Err(WorkflowError::Stopped { .. })
    ));
}

// ------------------------------------------------------------- the test kit

fn kit() -> ProcessManagerTest<Fulfil> {
    let runtime = memory_runtime();
    ProcessManagerTest::new(Fulfil::new(&runtime, Duration::from_secs(60)))
}

fn placed(card: bool) -> OrderEvent {
    OrderEvent::Placed {
        sku: "s1".into(),
        quantity: 2,
        amount: 101,
        card,
    }
}

#[tokio::test]
async fn the_kit_checks_commands_and_timers() {
    kit()
        .when("order-o1", placed(true))
        .then_expect_commands([Step::Reserve {
            sku: "s1".into(),
            order: "o1".into(),
            quantity: 2,
        }])
        .then_expect_timers([("unpaid", WakeAt::After(Duration::from_secs(60)))])
        .then_expect_running();
    let reserved = StockEvent::Reserved {
        order: "o1".into(),
        quantity: 2,
    };
    let paying = kit()
        .given("order-o1", [placed(true)])
        .when("stock-s1", reserved)
        .then_expect_commands([Step::TakePayment {
            order: "o1".into(),
            amount: 101,
        }]);
    assert_eq!(paying.state().stage, Stage::Paying);
    let state = Fulfilment {
        stage: Stage::Paying,
        order: "o1".into(),
        sku: "s1".into(),
        quantity: 2,
        amount: 101,
        card: true,
    };
    kit()
        .given_state(state.clone())
        .when_refused(
            Step::TakePayment {
                order: "o1".into(),
                amount: 101,
            },
            "card declined",
        )
        .then_expect_commands([
            Step::Release {
                sku: "s1".into(),
                order: "o1".into(),
            },
            Step::Cancel {
                order: "o1".into(),
                reason: "card declined".into(),
            },
        ])
        .then_expect_cancelled_timers(["unpaid"])
        .then_expect_complete();
    kit()
        .given_state(state)
        .when_timer("unpaid")
        .then_expect_commands([Step::VoidPayment { order: "o1".into() }]);
}

#[test]
#[should_panic(expected = "expected commands")]
fn the_kit_names_both_sides_when_commands_differ() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    kit()
        .when("order-o1", placed(true))
        .then_expect_commands([Step::Ship { order: "o1".into() }]);
}
