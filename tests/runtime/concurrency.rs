//! Concurrency: many tasks on many aggregates end in the states a sequential
//! model computes; one actor per stream however many tasks race on it;
//! commands to one aggregate run in arrival order; domain refusals store
//! nothing; correlation ids reach the events; time travel is read-only.

use crate::common;

use std::sync::Arc;

use annals::runtime::RuntimeStore;
use annals::store::ReadDirection;
use annals::{
    CommandContext, CommandError, EventStore, MemoryStore, Runtime, RuntimeConfig, SledStore,
    StreamId, Version,
};
use common::{model, Ledger, LedgerCommand as C, LedgerError, TestStore};
use uuid::Uuid;

/// A deterministic command script per ledger, with refusals in it.
fn script(ledger: usize, length: usize) -> Vec<C> {
    let mut commands = vec![C::Open];
    let mut seed = ledger as u64 * 7919 + 17;
    for _ in 1..length {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let amount = (seed >> 33) % 50;
        commands.push(match (seed >> 20) % 5 {
            0 | 1 => C::Deposit(amount),
            2 => C::Withdraw(amount), // sometimes refused: insufficient funds
            3 => C::DepositTwice(amount),
            _ => C::Open, // always refused after the first
        });
    }
    commands
}

async fn run_scripts(
    runtime: &Runtime<impl RuntimeStore + ?Sized>,
    ledgers: usize,
    length: usize,
    tasks: usize,
) {
    let handle = runtime.aggregates::<Ledger>();
    let mut joins = Vec::new();
    for task in 0..tasks {
        let handle = handle.clone();
        joins.push(tokio::spawn(async move {
            // Each task drives its ledgers' scripts interleaved, so every
            // ledger sees one command at a time from its own script while
            // the tasks run in parallel over all ledgers.
            let mine: Vec<usize> = (task..ledgers).step_by(tasks).collect();
            let scripts: Vec<Vec<C>> = mine.iter().map(|&l| script(l, length)).collect();
            for step in 0..length {
                for (ledger, commands) in mine.iter().zip(&scripts) {
                    let id = ledger.to_string();
                    match handle.execute(&id, commands[step].clone()).await {
                        Ok(_) | Err(CommandError::Domain(_)) => {}
                        Err(other) => panic!("ledger {id}: {other}"),
                    }
                }
            }
        }));
    }
    for join in joins {
        join.await.unwrap();
    }
}

async fn check_against_model(
    runtime: &Runtime<impl RuntimeStore + ?Sized>,
    ledgers: usize,
    length: usize,
) {
    let handle = runtime.aggregates::<Ledger>();
    let mut events = 0;
    for ledger in 0..ledgers {
        let expected = model(&script(ledger, length));
        let id = ledger.to_string();
        assert_eq!(
            handle.state(&id).await.unwrap(),
            expected,
            "ledger {ledger}"
        );
        // The store holds exactly the model's events: versions 1..n.
        let stream = StreamId::new(format!("ledger-{ledger}")).unwrap();
        assert_eq!(
            runtime.store().stream_version(&stream).await.unwrap(),
            Version(expected.events)
        );
        events += expected.events;
    }
    assert_eq!(
        runtime.store().head_position().0,
        events,
        "no event lost or duplicated in $all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_on_many_aggregates_match_a_sequential_model() {
    let config = RuntimeConfig::builder().snapshot_every(10).build().unwrap();
    let runtime = Runtime::new(Arc::new(MemoryStore::new()), config);
    run_scripts(&runtime, 300, 30, 16).await;
    check_against_model(&runtime, 300, 30).await;
    runtime.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_on_sled_match_the_model_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = RuntimeConfig::builder().snapshot_every(7).build().unwrap();
    let runtime = Runtime::new(
        Arc::new(SledStore::open(dir.path()).unwrap()),
        config.clone(),
    );
    run_scripts(&runtime, 64, 12, 32).await;
    check_against_model(&runtime, 64, 12).await;
    runtime.shutdown().await.unwrap();
    // Once shutdown returns, no actor holds the store any more: only the
    // runtime's own two handles (its typed one and the actors' `dyn` one)...
    assert_eq!(Arc::strong_count(runtime.store()), 2);
    drop(runtime); // ...so this releases sled's lock on the directory

    let reopened = Runtime::new(Arc::new(common::reopen_sled(dir.path()).await), config);
    check_against_model(&reopened, 64, 12).await;
    reopened.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_aggregates_share_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let handle = runtime.aggregates::<Ledger>();
    let mut joins = Vec::new();
    for ledger in 0..200 {
        let handle = handle.clone();
        joins.push(tokio::spawn(async move {
            let id = ledger.to_string();
            handle.execute(&id, C::Open).await.unwrap();
            handle.execute(&id, C::Deposit(1)).await.unwrap();
            handle.execute(&id, C::Deposit(2)).await.unwrap();
        }));
    }
    for join in joins {
        join.await.unwrap();
    }
    let stats = store.stats();
    assert_eq!(stats.appends, 600);
    // Each actor awaits its own append, so while one group is being synced
    // the others queue up for the next: far fewer syncs than appends.
    assert!(
        stats.group_commits * 3 <= stats.appends,
        "{} group commits for {} appends",
        stats.group_commits,
        stats.appends
    );
    runtime.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_first_commands_spawn_exactly_one_actor() {
    // A slow recovery keeps the race open: every task arrives while the
    // first actor is still starting.
    let store = Arc::new(TestStore {
        load_delay: Some(std::time::Duration::from_millis(20)),
        ..TestStore::new()
    });
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("other", C::Open).await.unwrap();
    let tasks = 64;
    let barrier = Arc::new(tokio::sync::Barrier::new(tasks));
    let mut joins = Vec::new();
    for _ in 0..tasks {
        let handle = handle.clone();
        let barrier = barrier.clone();
        joins.push(tokio::spawn(async move {
            barrier.wait().await;
            handle.execute("racy", C::Open).await
        }));
    }
    let mut opened = 0;
    for join in joins {
        match join.await.unwrap() {
            Ok(executed) => {
                opened += 1;
                assert_eq!(executed.version, Version(1));
            }
            Err(CommandError::Domain(LedgerError::AlreadyOpen)) => {}
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(opened, 1, "exactly one Open wins");
    assert_eq!(
        store.loads_of("ledger-racy"),
        1,
        "exactly one actor recovered the stream"
    );
    assert_eq!(runtime.live_aggregates(), 2);
    runtime.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_to_one_aggregate_run_in_arrival_order() {
    let runtime = Runtime::new(Arc::new(MemoryStore::new()), RuntimeConfig::default());
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("ordered", C::Open).await.unwrap();
    // The actor exists, so each future sends its command on its first poll;
    // join_all polls them in order.
    let results =
        futures::future::join_all((0..200).map(|seq| handle.execute("ordered", C::Note(seq))))
            .await;
    for (seq, result) in results.into_iter().enumerate() {
        assert_eq!(result.unwrap().version, Version(seq as u64 + 2));
    }
    let state = handle.state("ordered").await.unwrap();
    assert_eq!(state.notes, (0..200).collect::<Vec<_>>());
    runtime.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_on_one_aggregate_lose_nothing() {
    let runtime = Runtime::new(Arc::new(MemoryStore::new()), RuntimeConfig::default());
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("hot", C::Open).await.unwrap();
    let mut joins = Vec::new();
    for task in 0..32u64 {
        let handle = handle.clone();
        joins.push(tokio::spawn(async move {
            for i in 0..20 {
                handle
                    .execute("hot", C::Deposit(task * 100 + i))
                    .await
                    .unwrap();
            }
        }));
    }
    for join in joins {
        join.await.unwrap();
    }
    let expected: u64 = (0..32u64)
        .flat_map(|t| (0..20).map(move |i| t * 100 + i))
        .sum();
    let state = handle.state("hot").await.unwrap();
    assert_eq!(state.balance, expected);
    assert_eq!(state.events, 1 + 32 * 20);
    let stream = StreamId::new("ledger-hot").unwrap();
    let events = runtime
        .store()
        .read_stream(&stream, Version::FIRST, ReadDirection::Forward, 10_000)
        .await
        .unwrap();
    let versions: Vec<u64> = events.iter().map(|e| e.version.0).collect();
    assert_eq!(versions, (1..=641).collect::<Vec<_>>());
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn domain_refusals_store_nothing_and_context_reaches_the_events() {
    let runtime = Runtime::new(Arc::new(MemoryStore::new()), RuntimeConfig::default());
    let handle = runtime.aggregates::<Ledger>();
    let stream = StreamId::new("ledger-a").unwrap();

    let refused = handle.execute("a", C::Deposit(5)).await.unwrap_err();
    assert!(
        matches!(refused, CommandError::Domain(LedgerError::NotOpen)),
        "{refused}"
    );
    assert_eq!(
        runtime.store().stream_version(&stream).await.unwrap(),
        Version::NONE
    );

    let context = CommandContext::new(Uuid::now_v7(), Uuid::now_v7());
    let executed = handle
        .execute_with("a", C::Open, context.clone())
        .await
        .unwrap();
    assert_eq!(executed.version, Version(1));
    assert_eq!(executed.position.map(|p| p.0), Some(1));
    let twice = handle.execute("a", C::DepositTwice(3)).await.unwrap();
    assert_eq!(twice.events.len(), 2);
    assert_eq!(twice.version, Version(3));
    let overdrawn = handle.execute("a", C::Withdraw(7)).await.unwrap_err();
    assert!(matches!(
        overdrawn,
        CommandError::Domain(LedgerError::InsufficientFunds {
            balance: 6,
            asked: 7
        })
    ));
    let nothing = handle.execute("a", C::Nothing).await.unwrap();
    assert!(nothing.events.is_empty() && nothing.position.is_none());
    assert_eq!(nothing.version, Version(3));
    assert_eq!(
        runtime.store().stream_version(&stream).await.unwrap(),
        Version(3)
    );

    let stored = runtime
        .store()
        .read_stream(&stream, Version::FIRST, ReadDirection::Forward, 10)
        .await
        .unwrap();
    assert_eq!(stored[0].event_type, "Opened");
    assert_eq!(stored[0].metadata.correlation_id, context.correlation_id);
    assert_eq!(stored[0].metadata.causation_id, context.causation_id);
    assert_eq!(stored[1].metadata.correlation_id, None);

    let empty = handle.execute("", C::Open).await.unwrap_err();
    assert!(matches!(empty, CommandError::InvalidInput(_)), "{empty}");
    let too_long = handle.execute(&"x".repeat(300), C::Open).await.unwrap_err();
    assert!(
        matches!(too_long, CommandError::InvalidInput(_)),
        "{too_long}"
    );
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn state_at_travels_in_time_without_touching_the_live_actor() {
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(
        store.clone(),
        RuntimeConfig::builder().snapshot_every(4).build().unwrap(),
    );
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("t", C::Open).await.unwrap();
    for amount in 1..=9 {
        handle.execute("t", C::Deposit(amount)).await.unwrap();
    }
    tokio::task::yield_now().await;
    let loads = store.loads_of("ledger-t");
    assert_eq!(
        handle.state_at("t", Version(0)).await.unwrap(),
        Ledger::default()
    );
    let at_3 = handle.state_at("t", Version(3)).await.unwrap();
    assert_eq!((at_3.balance, at_3.events), (1 + 2, 3));
    let at_10 = handle.state_at("t", Version(10)).await.unwrap();
    assert_eq!(at_10, handle.state("t").await.unwrap());
    assert!(handle.state_at("t", Version(11)).await.is_err());
    // state_at reads the store (a snapshot load each) but the live actor
    // keeps running: the next command needs no recovery.
    assert_eq!(store.loads_of("ledger-t"), loads + 3);
    handle.execute("t", C::Deposit(100)).await.unwrap();
    assert_eq!(store.loads_of("ledger-t"), loads + 3);
    assert!(handle.is_live("t"));
    runtime.shutdown().await.unwrap();
}
