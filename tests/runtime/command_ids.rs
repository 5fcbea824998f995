//! Commands that run exactly once (invariant I7): a command sent with a
//! command id, sent again (concurrently, after the aggregate moved on,
//! after a lost acknowledgement, after a restart, from another process),
//! answers with its original outcome and stores nothing new; the id reused
//! for another command is a typed error with nothing stored. On memory,
//! sled and PostgreSQL.

use crate::common;
use crate::pg_support;

use std::sync::Arc;

use annals::runtime::{derived_event_id, COMMAND_FINGERPRINT_KEY, COMMAND_ID_KEY};
use annals::store::ReadDirection;
use annals::testing::{FaultPlan, FaultyStore};
use annals::{
    Aggregates, CommandContext, CommandError, EventStore, MemoryStore, Runtime, RuntimeConfig,
    SledStore, Version,
};
use common::{Ledger, LedgerCommand, LedgerEvent};
use uuid::Uuid;

fn runtime(store: Arc<dyn EventStore>) -> Runtime {
    Runtime::new(store, RuntimeConfig::default())
}

fn sled(dir: &tempfile::TempDir) -> Arc<dyn EventStore> {
    Arc::new(SledStore::open(dir.path()).unwrap())
}

fn postgres() -> Arc<dyn EventStore> {
    Arc::new(pg_support::open(pg_support::config()))
}

fn with_id(id: Uuid) -> CommandContext {
    CommandContext::default().with_command_id(id)
}

async fn stream_len(store: &dyn EventStore, stream: &str) -> u64 {
    store
        .stream_version(&annals::StreamId::new(stream).unwrap())
        .await
        .unwrap()
        .0
}

async fn open_ledger(ledgers: &Aggregates<Ledger>, id: &str) {
    ledgers.execute(id, LedgerCommand::Open).await.unwrap();
}

/// 32 tasks send the same 8 command ids (each a two-event deposit) to one
/// ledger, every task every id: each id stores its two events once, and
/// every answer for an id is the same.
async fn concurrent_retries(runtime: Runtime, other: Option<Runtime>) {
    let ledgers = runtime.aggregates::<Ledger>();
    open_ledger(&ledgers, "c").await;
    let ids: Vec<Uuid> = (0..8).map(|_| Uuid::now_v7()).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..32u64 {
        let runtime = match (&other, task % 2) {
            (Some(other), 1) => other.clone(),
            _ => runtime.clone(),
        };
        let ids = ids.clone();
        tasks.spawn(async move {
            let ledgers = runtime.aggregates::<Ledger>();
            let mut answers = Vec::new();
            for (n, id) in ids
                .iter()
                .enumerate()
                .cycle()
                .skip(task as usize)
                .take(ids.len())
            {
                let amount = n as u64 + 1;
                let executed = loop {
                    match ledgers
                        .execute_with("c", LedgerCommand::DepositTwice(amount), with_id(*id))
                        .await
                    {
                        Ok(executed) => break executed,
                        // Two processes: a conflict past the retries is a
                        // failure to retry, never a duplicate.
                        Err(CommandError::Conflict { .. }) => continue,
                        Err(other) => panic!("command {id}: {other}"),
                    }
                };
                answers.push((*id, executed.version, executed.position, executed.events));
            }
            answers
        });
    }
    let mut seen = std::collections::HashMap::new();
    while let Some(answers) = tasks.join_next().await {
        for (id, version, position, events) in answers.unwrap() {
            assert_eq!(events.len(), 2, "both events of {id} answered");
            let first = seen.entry(id).or_insert((version, position));
            assert_eq!(
                *first,
                (version, position),
                "every answer for {id} is the same"
            );
        }
    }
    let store = runtime.store();
    // Opened, then two events per id: nothing twice.
    assert_eq!(stream_len(&**store, "ledger-c").await, 1 + 2 * 8);
    let balance = ledgers.state("c").await.unwrap().balance;
    assert_eq!(balance, (1..=8).map(|a| 2 * a).sum::<u64>());
    // Each answer points at that command's own events.
    let stream = annals::StreamId::new("ledger-c").unwrap();
    for (id, (version, position)) in seen {
        let last = store
            .read_event(derived_event_id(id, &stream, 1))
            .await
            .unwrap()
            .expect("the second event of the command is stored");
        assert_eq!((last.version, Some(last.position)), (version, position));
        assert_eq!(last.metadata.extra[COMMAND_ID_KEY], id.to_string());
        assert!(last.metadata.extra.contains_key(COMMAND_FINGERPRINT_KEY));
    }
    if let Some(other) = other {
        other.shutdown().await.unwrap();
    }
    runtime.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_store_each_command_once_on_memory() {
    concurrent_retries(runtime(Arc::new(MemoryStore::new())), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_store_each_command_once_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    concurrent_retries(runtime(sled(&dir)), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_from_two_processes_store_each_command_once_on_postgres() {
    if pg_support::disabled() {
        return;
    }
    let config = pg_support::config();
    // Two stores on one schema: two processes, each with its own runtime
    // and its own actor for the ledger.
    let one = runtime(Arc::new(pg_support::open(config.clone())));
    let two = runtime(Arc::new(pg_support::open(config)));
    concurrent_retries(one, Some(two)).await;
}

/// After the aggregate moved on (other commands, a state where the command
/// would now be refused), the retry answers with the original outcome.
async fn retry_after_the_aggregate_moved_on(runtime: Runtime) {
    let ledgers = runtime.aggregates::<Ledger>();
    open_ledger(&ledgers, "m").await;
    ledgers
        .execute("m", LedgerCommand::Deposit(100))
        .await
        .unwrap();
    let id = Uuid::now_v7();
    let first = ledgers
        .execute_with("m", LedgerCommand::Withdraw(100), with_id(id))
        .await
        .unwrap();
    assert_eq!(first.version, Version(3));
    ledgers.execute("m", LedgerCommand::Note(1)).await.unwrap();
    // The balance is 0: decided again, this withdrawal would be refused.
    let again = ledgers
        .execute_with(
            "m",
            LedgerCommand::Withdraw(100),
            with_id(id).returning_state(),
        )
        .await
        .expect("the original outcome, not a refusal");
    assert_eq!(again.version, first.version);
    assert_eq!(again.position, first.position);
    assert_eq!(again.events, vec![LedgerEvent::Withdrawn { amount: 100 }]);
    assert_eq!(again.state.unwrap().notes, vec![1], "the current state");
    // Even with an expected version the stream is no longer at.
    let expecting = ledgers
        .execute_with(
            "m",
            LedgerCommand::Withdraw(100),
            with_id(id).expecting(Version(1)),
        )
        .await
        .unwrap();
    assert_eq!(expecting.version, first.version);
    assert_eq!(stream_len(&**runtime.store(), "ledger-m").await, 4);
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_retry_after_the_aggregate_moved_on_answers_the_original_outcome_on_memory() {
    retry_after_the_aggregate_moved_on(runtime(Arc::new(MemoryStore::new()))).await;
}

#[tokio::test]
async fn a_retry_after_the_aggregate_moved_on_answers_the_original_outcome_on_postgres() {
    if pg_support::disabled() {
        return;
    }
    retry_after_the_aggregate_moved_on(runtime(postgres())).await;
}

/// The same id with another command: a typed error, nothing stored.
async fn reuse_for_another_command(runtime: Runtime) {
    let ledgers = runtime.aggregates::<Ledger>();
    open_ledger(&ledgers, "r").await;
    let id = Uuid::now_v7();
    ledgers
        .execute_with("r", LedgerCommand::Deposit(5), with_id(id))
        .await
        .unwrap();
    let reused = ledgers
        .execute_with("r", LedgerCommand::Deposit(6), with_id(id))
        .await;
    match reused {
        Err(CommandError::CommandIdReused { stream, command_id }) => {
            assert_eq!(stream.as_str(), "ledger-r");
            assert_eq!(command_id, id);
        }
        other => panic!("expected CommandIdReused, got {other:?}"),
    }
    assert_eq!(stream_len(&**runtime.store(), "ledger-r").await, 2);
    assert_eq!(ledgers.state("r").await.unwrap().balance, 5);
    // The same id on another aggregate is another command.
    open_ledger(&ledgers, "r2").await;
    ledgers
        .execute_with("r2", LedgerCommand::Deposit(6), with_id(id))
        .await
        .unwrap();
    assert_eq!(ledgers.state("r2").await.unwrap().balance, 6);
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_id_reused_for_another_command_is_refused_on_memory() {
    reuse_for_another_command(runtime(Arc::new(MemoryStore::new()))).await;
}

#[tokio::test]
async fn an_id_reused_for_another_command_is_refused_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    reuse_for_another_command(runtime(sled(&dir))).await;
}

#[tokio::test]
async fn an_id_reused_for_another_command_is_refused_on_postgres() {
    if pg_support::disabled() {
        return;
    }
    reuse_for_another_command(runtime(postgres())).await;
}

#[tokio::test]
async fn a_retry_after_a_restart_answers_the_original_outcome_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    let id = Uuid::now_v7();
    let first = {
        let runtime = Runtime::open(dir.path()).unwrap();
        let ledgers = runtime.aggregates::<Ledger>();
        open_ledger(&ledgers, "s").await;
        let first = ledgers
            .execute_with("s", LedgerCommand::DepositTwice(7), with_id(id))
            .await
            .unwrap();
        runtime.shutdown().await.unwrap();
        first
    };
    let runtime = Runtime::open(dir.path()).unwrap();
    let ledgers = runtime.aggregates::<Ledger>();
    ledgers.execute("s", LedgerCommand::Note(9)).await.unwrap();
    let again = ledgers
        .execute_with("s", LedgerCommand::DepositTwice(7), with_id(id))
        .await
        .unwrap();
    assert_eq!(
        (again.version, again.position),
        (first.version, first.position)
    );
    assert_eq!(again.events, first.events);
    assert_eq!(stream_len(&**runtime.store(), "ledger-s").await, 4);
    assert_eq!(ledgers.state("s").await.unwrap().balance, 14);
    runtime.shutdown().await.unwrap();
}

/// Half the acknowledgements are lost after the commit: the caller retries
/// each command with its id until it gets an answer; every command is
/// stored once, and the answer is its stored outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_acknowledgements_retried_with_the_same_id_store_nothing_twice() {
    let mut plan = FaultPlan::none();
    plan.append_ack_lost = 0.5;
    let store = Arc::new(FaultyStore::new(Arc::new(MemoryStore::new()), plan));
    let runtime = runtime(Arc::clone(&store) as Arc<dyn EventStore>);
    let ledgers = runtime.aggregates::<Ledger>();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..16u64 {
        let ledgers = ledgers.clone();
        tasks.spawn(async move {
            let id = format!("f{task}");
            let mut retries = 0u32;
            let open = Uuid::now_v7();
            while ledgers
                .execute_with(&id, LedgerCommand::Open, with_id(open))
                .await
                .is_err()
            {
                retries += 1;
            }
            for amount in 1..=10u64 {
                let command_id = Uuid::now_v7();
                loop {
                    match ledgers
                        .execute_with(&id, LedgerCommand::Deposit(amount), with_id(command_id))
                        .await
                    {
                        Ok(executed) => {
                            assert_eq!(executed.events, vec![LedgerEvent::Deposited { amount }]);
                            assert_eq!(executed.version, Version(amount + 1));
                            break;
                        }
                        Err(CommandError::Domain(refusal)) => panic!("refused: {refusal}"),
                        Err(_) => retries += 1,
                    }
                }
            }
            retries
        });
    }
    let mut retries = 0;
    while let Some(done) = tasks.join_next().await {
        retries += done.unwrap();
    }
    assert!(
        retries > 20,
        "the fault plan lost acknowledgements ({retries} retries)"
    );
    for task in 0..16u64 {
        let stream = format!("ledger-f{task}");
        assert_eq!(stream_len(&**store.inner(), &stream).await, 11, "{stream}");
        let balance = ledgers.state(&format!("f{task}")).await.unwrap().balance;
        assert_eq!(balance, 55);
    }
    let events = store
        .inner()
        .read_stream(
            &annals::StreamId::new("ledger-f0").unwrap(),
            Version::FIRST,
            ReadDirection::Forward,
            100,
        )
        .await
        .unwrap();
    assert!(events.iter().all(|e| e.event_id.get_version_num() == 8));
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_timeout_says_the_outcome_is_unknown_and_a_retry_is_safe() {
    let error: CommandError<common::LedgerError> = CommandError::Timeout {
        stream: annals::StreamId::new("ledger-t").unwrap(),
        after: std::time::Duration::from_secs(1),
    };
    assert!(error.is_outcome_unknown());
    assert!(error
        .to_string()
        .contains("retrying with the same command id is safe"));
    let lost: CommandError<common::LedgerError> =
        CommandError::Store(annals::StoreError::OutcomeUnknown("connection lost".into()));
    assert!(lost.is_outcome_unknown());
    let refused: CommandError<common::LedgerError> =
        CommandError::Domain(common::LedgerError::NotOpen);
    assert!(!refused.is_outcome_unknown());
}
