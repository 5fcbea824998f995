//! A fired timer's commands are sent even when the run that recorded the
//! timer's step stopped before sending them. Unlike an event, a fired
//! timer is not read again from the log (its recorded step removed it), so
//! the restarted workflow must resend the step's commands itself, with the
//! same command id; before the fix the instance waited forever (the hang
//! `tests/workflow_crash.rs` hit at 25 cycles: a transfer order whose
//! `unpaid` timer step was recorded but whose `VoidPayment` never ran).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use annals::workflow::{Input, ProcessManager, Reaction, Sent, WorkflowConfig};
use annals::{
    CommandContext, EventStore, ExpectedVersion, MemoryStore, NewEvent, RecordedEvent, Runtime,
    RuntimeConfig, StreamId,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Act {
    VoidPayment,
}

/// Shared by both runs: whether `send` fails, and every attempt's
/// (command, command id, whether it was answered `Done`).
#[derive(Default)]
struct Probe {
    failing: AtomicBool,
    attempts: Mutex<Vec<(Act, Uuid, bool)>>,
}

/// One instance per `order` stream: a timer in the past on the first
/// event; the timer sends `VoidPayment` and completes the instance.
struct Voider {
    probe: Arc<Probe>,
}

impl ProcessManager for Voider {
    type State = u32;
    type Command = Act;
    const NAME: &'static str = "voider";

    fn instance_of(&self, event: &RecordedEvent) -> Option<String> {
        (event.stream_id.category() == "order").then(|| "one".to_owned())
    }

    fn react(&self, state: &u32, input: &Input<'_, Act>) -> Reaction<u32, Act> {
        match input {
            Input::Event(_) => Reaction::new(state + 1).wake_at("unpaid", SystemTime::UNIX_EPOCH),
            Input::Timer { .. } => Reaction::new(state + 1).send(Act::VoidPayment).complete(),
            _ => Reaction::new(*state),
        }
    }

    async fn send(&self, command: Act, context: CommandContext) -> Sent {
        let id = context.command_id.expect("a derived command id");
        let failing = self.probe.failing.load(Ordering::SeqCst);
        self.probe
            .attempts
            .lock()
            .unwrap()
            .push((command, id, !failing));
        if failing {
            Sent::Failed("payments down".to_owned())
        } else {
            Sent::Done
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_timer_step_is_resent_after_a_restart() {
    let store = Arc::new(MemoryStore::new());
    let probe = Arc::new(Probe::default());
    probe.failing.store(true, Ordering::SeqCst);

    // First run: the timer fires, its step is recorded, and its command
    // fails until the workflow is stopped in the middle of the retries.
    let first = Runtime::new(Arc::clone(&store), RuntimeConfig::default());
    let workflow = first
        .start_workflow(
            Voider {
                probe: Arc::clone(&probe),
            },
            WorkflowConfig::default(),
        )
        .await
        .unwrap();
    let order = StreamId::new("order-1").unwrap();
    store
        .append(
            &order,
            ExpectedVersion::Any,
            vec![NewEvent::new("Placed", Vec::new())],
        )
        .await
        .unwrap();
    // Bounded: the past timer fires at once, the first attempt follows.
    for _ in 0..30_000 {
        if !probe.attempts.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let status = workflow.shutdown().await;
    let attempts = probe.attempts.lock().unwrap().clone();
    assert!(!attempts.is_empty(), "the timer's command was tried");
    assert!(attempts.iter().all(|(_, _, done)| !done));
    assert_eq!(
        (status.completed, status.pending_timers),
        (1, 0),
        "the timer's step is recorded (it completes the instance)"
    );
    let command_id = attempts[0].1;

    // Second run on the same log, the payments back: the step's command
    // is sent before the workflow reads on, with the same command id.
    probe.failing.store(false, Ordering::SeqCst);
    let second = Runtime::new(Arc::clone(&store), RuntimeConfig::default());
    let workflow = second
        .start_workflow(
            Voider {
                probe: Arc::clone(&probe),
            },
            WorkflowConfig::default(),
        )
        .await
        .unwrap();
    workflow
        .wait_for(store.head_position(), Duration::from_secs(30))
        .await
        .unwrap();
    let done: Vec<_> = probe
        .attempts
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, _, done)| *done)
        .cloned()
        .collect();
    assert_eq!(
        done,
        vec![(Act::VoidPayment, command_id, true)],
        "the recorded timer step's command is resent once, with its id"
    );
    // The third run has nothing left to resend.
    let status = workflow.shutdown().await;
    assert_eq!((status.running, status.completed), (0, 1));
    let third = Runtime::new(Arc::clone(&store), RuntimeConfig::default());
    let workflow = third
        .start_workflow(
            Voider {
                probe: Arc::clone(&probe),
            },
            WorkflowConfig::default(),
        )
        .await
        .unwrap();
    workflow
        .wait_for(store.head_position(), Duration::from_secs(30))
        .await
        .unwrap();
    let sent_again = probe
        .attempts
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, _, done)| *done)
        .count();
    assert_eq!(sent_again, 1, "a step fully sent is not resent");
    workflow.shutdown().await;
    second.shutdown().await.unwrap();
}
