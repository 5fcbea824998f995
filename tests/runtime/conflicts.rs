//! Conflicts with another writer (a direct store append, or a second
//! runtime standing in for another process): the actor catches up and
//! decides the same command again on the new state, up to the retry limit,
//! then reports the conflict.

use crate::common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use annals::{CommandError, EventStore, Runtime, RuntimeConfig, StreamId, Version};
use common::{outside_append, Ledger, LedgerCommand as C, LedgerError, LedgerEvent, TestStore};

#[tokio::test]
async fn an_outside_append_is_caught_up_and_the_command_retried() {
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("c", C::Open).await.unwrap();
    handle.execute("c", C::Deposit(10)).await.unwrap();

    let outside = outside_append(&*store, "ledger-c", LedgerEvent::Deposited { amount: 5 }).await;
    assert_eq!(outside.last_version, Version(3));
    let appends = store.appends.load(Ordering::SeqCst);
    let executed = handle.execute("c", C::Deposit(1)).await.unwrap();
    assert_eq!(executed.version, Version(4));
    assert_eq!(
        store.appends.load(Ordering::SeqCst) - appends,
        2,
        "one conflict, one retry"
    );
    let state = handle.state("c").await.unwrap();
    assert_eq!((state.balance, state.events), (16, 4));
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_retry_decides_again_on_the_new_state() {
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("w", C::Open).await.unwrap();
    handle.execute("w", C::Deposit(10)).await.unwrap();
    // Another writer spends most of the money.
    outside_append(&*store, "ledger-w", LedgerEvent::Withdrawn { amount: 8 }).await;
    let refused = handle.execute("w", C::Withdraw(5)).await.unwrap_err();
    assert!(
        matches!(
            refused,
            CommandError::Domain(LedgerError::InsufficientFunds {
                balance: 2,
                asked: 5
            })
        ),
        "{refused}"
    );
    let stream = StreamId::new("ledger-w").unwrap();
    assert_eq!(
        runtime.store().stream_version(&stream).await.unwrap(),
        Version(3)
    );
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refusal_is_never_decided_on_a_stale_state() {
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("f", C::Open).await.unwrap();
    handle.execute("f", C::Deposit(10)).await.unwrap();
    // The actor believes the balance is 10; another writer made it 30.
    outside_append(&*store, "ledger-f", LedgerEvent::Deposited { amount: 20 }).await;
    let executed = handle.execute("f", C::Withdraw(25)).await.unwrap();
    assert_eq!(executed.version, Version(4));
    assert_eq!(handle.state("f").await.unwrap().balance, 5);
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn nothing_to_do_is_never_decided_on_a_stale_state() {
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("n", C::Open).await.unwrap();
    // The actor believes the stream is at version 1; another writer moved
    // it to 2. A decision with no events stores nothing, so no conflict
    // would reveal the stale state: the answer must not come from it.
    outside_append(&*store, "ledger-n", LedgerEvent::Deposited { amount: 20 }).await;
    let nothing = handle.execute("n", C::Nothing).await.unwrap();
    assert!(nothing.events.is_empty() && nothing.position.is_none());
    assert_eq!(nothing.version, Version(2));
    // Caught up: the next command appends once, with no conflict.
    let appends = store.appends.load(Ordering::SeqCst);
    assert_eq!(
        handle.execute("n", C::Deposit(1)).await.unwrap().version,
        Version(3)
    );
    assert_eq!(store.appends.load(Ordering::SeqCst) - appends, 1);
    runtime.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_conflict_that_persists_past_the_retries_is_reported_and_stores_nothing() {
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(
        store.clone(),
        RuntimeConfig::builder()
            .max_conflict_retries(2)
            .build()
            .unwrap(),
    );
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("k", C::Open).await.unwrap();
    store.interfere.store(true, Ordering::SeqCst);
    let appends = store.appends.load(Ordering::SeqCst);
    match handle.execute("k", C::Deposit(1)).await.unwrap_err() {
        CommandError::Conflict { stream, attempts } => {
            assert_eq!((stream.as_str(), attempts), ("ledger-k", 3));
        }
        other => panic!("{other}"),
    }
    assert_eq!(store.appends.load(Ordering::SeqCst) - appends, 3);
    store.interfere.store(false, Ordering::SeqCst);
    // Only the other writer's three events were stored (state catches up).
    let state = handle.state("k").await.unwrap();
    assert_eq!((state.balance, state.notes.len()), (0, 3));
    let executed = handle.execute("k", C::Deposit(1)).await.unwrap();
    assert_eq!(executed.version, Version(5));
    assert_eq!(handle.state("k").await.unwrap().notes, vec![999, 999, 999]);
    runtime.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runtimes_writing_one_aggregate_lose_nothing() {
    let store = Arc::new(TestStore::new());
    let config = RuntimeConfig::builder()
        .max_conflict_retries(1000)
        .build()
        .unwrap();
    let first = Runtime::new(store.clone(), config.clone());
    let second = Runtime::new(store.clone(), config);
    first
        .aggregates::<Ledger>()
        .execute("shared", C::Open)
        .await
        .unwrap();
    let mut joins = Vec::new();
    for (index, runtime) in [first.clone(), second.clone()].into_iter().enumerate() {
        for task in 0..4u64 {
            let handle = runtime.aggregates::<Ledger>();
            joins.push(tokio::spawn(async move {
                for i in 0..25 {
                    handle
                        .execute("shared", C::Deposit(index as u64 * 1000 + task * 100 + i))
                        .await
                        .unwrap();
                }
            }));
        }
    }
    for join in joins {
        join.await.unwrap();
    }
    let expected: u64 = (0..2u64)
        .flat_map(|r| (0..4u64).flat_map(move |t| (0..25).map(move |i| r * 1000 + t * 100 + i)))
        .sum();
    for runtime in [&first, &second] {
        let state = runtime
            .aggregates::<Ledger>()
            .state("shared")
            .await
            .unwrap();
        assert_eq!((state.balance, state.events), (expected, 201));
    }
    first.shutdown().await.unwrap();
}
