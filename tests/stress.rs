//! Stress: many tasks at once on a few hot aggregates and on many cold ones
//! (more than may stay live, with a short idle timeout, so actors are
//! evicted, passivated and reloaded from snapshots under load), with state
//! queries mixed in. No deadlock (the whole run has a deadline), no lost
//! reply (every `execute` returns), and every reply matches the store: the
//! events stored under a command's correlation id are exactly the events,
//! versions and positions its reply gave, and refused or rejected commands
//! stored nothing.
//!
//! `ANNALS_STRESS_COMMANDS=N` sets the commands per task (default 40).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use annals::codec::decode_event;
use annals::runtime::RuntimeStore;
use annals::store::{EventFilter, ReadDirection};
use annals::{
    Aggregate, CommandContext, CommandError, Executed, MemoryStore, Position, Runtime,
    RuntimeConfig, SledStore, Version,
};
use common::{Ledger, LedgerCommand as C, LedgerError, LedgerEvent};
use uuid::Uuid;

const HOT: u64 = 4;
const COLD: u64 = 400;
const TASKS: u64 = 64;

fn commands_per_task() -> u64 {
    crate::common::setting("ANNALS_STRESS_COMMANDS", 40)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One answered command.
struct Reply {
    ledger: String,
    correlation: Uuid,
    result: Result<Executed<Ledger>, CommandError<LedgerError>>,
}

/// Runs the load and returns every reply; panics if it does not finish in
/// time (a deadlock or a lost reply).
async fn hammer(runtime: &Runtime<impl RuntimeStore + ?Sized>, commands: u64) -> Vec<Reply> {
    let ledgers = runtime.aggregates::<Ledger>();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let ledgers = ledgers.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ ((task + 1) * 0x9e37_79b9));
            let mut replies = Vec::new();
            for _ in 0..commands {
                let ledger = if rng.next() % 2 == 0 {
                    format!("hot{}", rng.next() % HOT)
                } else {
                    format!("cold{}", rng.next() % COLD)
                };
                if rng.next() % 10 == 0 {
                    // A query in the same queue as the commands.
                    ledgers.state(&ledger).await.unwrap();
                    continue;
                }
                let amount = 1 + rng.next() % 20;
                let command = match rng.next() % 10 {
                    0 => C::Open,
                    1..=5 => C::Deposit(amount),
                    6..=7 => C::Withdraw(amount), // refused on a low balance
                    8 => C::DepositTwice(amount),
                    _ => C::Note(rng.next()),
                };
                // The correlation id finds the command's events in the store.
                let correlation = Uuid::now_v7();
                let context = CommandContext::new(correlation, correlation);
                let mut result = ledgers
                    .execute_with(&ledger, command.clone(), context)
                    .await;
                if matches!(result, Err(CommandError::Domain(LedgerError::NotOpen))) {
                    replies.push(Reply {
                        ledger: ledger.clone(),
                        correlation,
                        result,
                    });
                    let correlation = Uuid::now_v7();
                    let context = CommandContext::new(correlation, correlation);
                    let opened = ledgers.execute_with(&ledger, C::Open, context).await;
                    replies.push(Reply {
                        ledger: ledger.clone(),
                        correlation,
                        result: opened,
                    });
                    let correlation = Uuid::now_v7();
                    let context = CommandContext::new(correlation, correlation);
                    result = ledgers.execute_with(&ledger, command, context).await;
                    replies.push(Reply {
                        ledger,
                        correlation,
                        result,
                    });
                    continue;
                }
                replies.push(Reply {
                    ledger,
                    correlation,
                    result,
                });
            }
            replies
        }));
    }
    let all = async {
        let mut replies = Vec::new();
        for task in tasks {
            replies.extend(task.await.expect("a task panicked"));
        }
        replies
    };
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("deadlock: the load did not finish in 120 s")
}

/// Every reply against the store; returns (acknowledged commands, events).
async fn check_replies(
    runtime: &Runtime<impl RuntimeStore + ?Sized>,
    replies: &[Reply],
) -> (u64, u64) {
    let store = runtime.store();
    let all = store
        .read_all(
            Position::START,
            ReadDirection::Forward,
            usize::MAX,
            &EventFilter::All,
        )
        .await
        .unwrap();
    for (index, event) in all.iter().enumerate() {
        assert_eq!(event.position.0, index as u64 + 1, "$all has a gap");
    }
    let mut by_command: HashMap<Uuid, Vec<&annals::RecordedEvent>> = HashMap::new();
    for event in &all {
        let correlation = event.metadata.correlation_id.expect("every event has one");
        by_command.entry(correlation).or_default().push(event);
    }
    let mut acknowledged = 0;
    let mut events = 0;
    for reply in replies {
        let stored = by_command.remove(&reply.correlation).unwrap_or_default();
        match &reply.result {
            Ok(executed) => {
                acknowledged += 1;
                events += stored.len() as u64;
                let decoded: Vec<LedgerEvent> =
                    stored.iter().map(|e| decode_event(e).unwrap()).collect();
                assert_eq!(
                    decoded, executed.events,
                    "{}: the stored events",
                    reply.ledger
                );
                let Some(last) = stored.last() else {
                    assert_eq!(executed.position, None);
                    continue;
                };
                assert_eq!(last.stream_id.as_str(), format!("ledger-{}", reply.ledger));
                assert_eq!(last.version, executed.version, "{}: version", reply.ledger);
                assert_eq!(Some(last.position), executed.position, "{}", reply.ledger);
                // One command's events: consecutive versions and positions.
                for pair in stored.windows(2) {
                    assert_eq!(pair[1].version, pair[0].version.next());
                    assert_eq!(pair[1].position, pair[0].position.next());
                }
            }
            Err(CommandError::Domain(_)) => {
                assert!(stored.is_empty(), "a refused command stored events");
            }
            Err(other) => panic!("{}: unexpected failure: {other}", reply.ledger),
        }
    }
    assert!(
        by_command.is_empty(),
        "{} commands stored events but were never acknowledged",
        by_command.len()
    );
    assert_eq!(events, all.len() as u64);

    // And every ledger's state is the fold of its stored events.
    let ledgers = runtime.aggregates::<Ledger>();
    let mut folded: HashMap<&str, Ledger> = HashMap::new();
    for event in &all {
        let state = folded.entry(event.stream_id.as_str()).or_default();
        state.apply(&decode_event(event).unwrap());
    }
    for (stream, state) in folded {
        let id = stream.strip_prefix("ledger-").unwrap();
        assert_eq!(&ledgers.state(id).await.unwrap(), &state, "{stream}");
        assert_eq!(
            store
                .stream_version(&annals::StreamId::new(stream).unwrap())
                .await
                .unwrap(),
            Version(state.events)
        );
    }
    (acknowledged, events)
}

fn config() -> RuntimeConfig {
    RuntimeConfig::builder()
        .snapshot_every(5)
        .max_live_aggregates(128)
        .idle_timeout(Duration::from_millis(20))
        .command_timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_and_cold_aggregates_on_sled_every_reply_matches_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    let runtime = Runtime::new(store, config());
    let replies = hammer(&runtime, commands_per_task()).await;
    let (acknowledged, events) = check_replies(&runtime, &replies).await;
    eprintln!(
        "stress (sled): {} replies, {acknowledged} acknowledged, {events} events",
        replies.len()
    );
    assert!(acknowledged > TASKS * commands_per_task() / 4);
    runtime.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_and_cold_aggregates_in_memory_every_reply_matches_the_store() {
    let runtime = Runtime::new(Arc::new(MemoryStore::new()), config());
    let replies = hammer(&runtime, commands_per_task() * 5).await;
    let (acknowledged, events) = check_replies(&runtime, &replies).await;
    eprintln!(
        "stress (memory): {} replies, {acknowledged} acknowledged, {events} events",
        replies.len()
    );
    runtime.shutdown().await.unwrap();
}

/// With a tiny bound on pending commands, one hot aggregate refuses some at
/// once (`Overloaded`, storing nothing) and answers every other: no reply
/// lost, none that disagrees with the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_overloaded_hot_aggregate_answers_every_command() {
    let runtime = Runtime::new(
        Arc::new(MemoryStore::new()),
        config()
            .to_builder()
            .max_pending_commands(4)
            .build()
            .unwrap(),
    );
    let ledgers = runtime.aggregates::<Ledger>();
    ledgers.execute("hot", C::Open).await.unwrap();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let ledgers = ledgers.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcome = (0u64, 0u64);
            for i in 0..commands_per_task() {
                match ledgers.execute("hot", C::Note(task * 1_000 + i)).await {
                    Ok(executed) => {
                        assert_eq!(executed.events.len(), 1);
                        outcome.0 += 1;
                    }
                    Err(CommandError::Overloaded { .. }) => outcome.1 += 1,
                    Err(other) => panic!("{other}"),
                }
            }
            outcome
        }));
    }
    let outcomes = tokio::time::timeout(Duration::from_secs(120), async {
        let mut totals = (0, 0);
        for task in tasks {
            let (done, refused) = task.await.unwrap();
            totals.0 += done;
            totals.1 += refused;
        }
        totals
    })
    .await
    .expect("deadlock");
    assert_eq!(outcomes.0 + outcomes.1, TASKS * commands_per_task());
    let state = ledgers.state("hot").await.unwrap();
    assert_eq!(
        state.notes.len() as u64,
        outcomes.0,
        "Ok means stored, once"
    );
    assert_eq!(state.events, outcomes.0 + 1);
    eprintln!(
        "overload: {} stored, {} refused as overloaded",
        outcomes.0, outcomes.1
    );
    runtime.shutdown().await.unwrap();
}
