//! Backpressure and timeouts: past the pending bound `execute` answers at
//! once with Overloaded; a command past its timeout gets Timeout, and one
//! that had not started by then never runs.

use crate::common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use annals::{CommandError, EventStore, QueryError, Runtime, RuntimeConfig, StreamId, Version};
use common::{Ledger, LedgerCommand as C, TestStore};
use tokio::sync::Semaphore;

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_pending_bound_execute_answers_overloaded_at_once() {
    let gate = Arc::new(Semaphore::new(1)); // lets the Open through
    let store = Arc::new(TestStore::gated(gate.clone()));
    let config = RuntimeConfig::builder()
        .max_pending_commands(3)
        .build()
        .unwrap();
    let runtime = Runtime::new(store.clone(), config);
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("o", C::Open).await.unwrap();

    // One command blocks in the store, two wait behind it: three pending.
    let mut accepted = Vec::new();
    for amount in 1..=3 {
        let handle = handle.clone();
        accepted.push(tokio::spawn(async move {
            handle.execute("o", C::Deposit(amount)).await
        }));
        while store.appends.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(20)).await;

    let refused = tokio::time::timeout(
        Duration::from_millis(100),
        handle.execute("o", C::Deposit(9)),
    )
    .await
    .expect("answered at once, not queued")
    .unwrap_err();
    match refused {
        CommandError::Overloaded { stream, pending } => {
            assert_eq!((stream.as_str(), pending), ("ledger-o", 3));
        }
        other => panic!("{other}"),
    }
    assert!(matches!(
        handle.state("o").await,
        Err(QueryError::Overloaded { .. })
    ));
    // Other aggregates are not affected by one overloaded aggregate...
    // (their appends wait at the same gate, so only check they are accepted)
    let other = tokio::spawn({
        let handle = handle.clone();
        async move { handle.execute("other", C::Open).await }
    });

    gate.add_permits(100);
    let mut versions = Vec::new();
    for join in accepted {
        versions.push(join.await.unwrap().unwrap().version.0);
    }
    // The first was running; the two others (sent by two tasks at about the
    // same time) came after it in either order.
    assert_eq!(versions[0], 2);
    versions.sort_unstable();
    assert_eq!(versions, vec![2, 3, 4]);
    other.await.unwrap().unwrap();
    assert_eq!(handle.state("o").await.unwrap().balance, 6);
    handle.execute("o", C::Deposit(4)).await.unwrap();
    runtime.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_command_past_its_timeout_gets_timeout_and_an_unstarted_one_never_runs() {
    let gate = Arc::new(Semaphore::new(1));
    let store = Arc::new(TestStore::gated(gate.clone()));
    let config = RuntimeConfig::builder()
        .command_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let runtime = Runtime::new(store.clone(), config);
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("t", C::Open).await.unwrap();

    let started = tokio::spawn({
        let handle = handle.clone();
        async move { handle.execute("t", C::Deposit(1)).await }
    });
    settle().await; // the first deposit is now waiting in the store
    let queued = tokio::spawn({
        let handle = handle.clone();
        async move { handle.execute("t", C::Deposit(100)).await }
    });
    let begun = tokio::time::Instant::now();
    for join in [started, queued] {
        match join.await.unwrap() {
            Err(CommandError::Timeout { stream, after }) => {
                assert_eq!(
                    (stream.as_str(), after),
                    ("ledger-t", Duration::from_secs(1))
                );
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(begun.elapsed(), Duration::from_secs(1));

    // The store comes back: the started command commits (its outcome was
    // unknown to its caller), the queued one is dropped unrun.
    gate.add_permits(100);
    settle().await;
    let state = handle.state("t").await.unwrap();
    assert_eq!(state.balance, 1);
    let stream = StreamId::new("ledger-t").unwrap();
    assert_eq!(
        runtime.store().stream_version(&stream).await.unwrap(),
        Version(2)
    );
    assert_eq!(
        store.appends.load(Ordering::SeqCst),
        2,
        "the queued command never reached the store"
    );
    runtime.shutdown().await.unwrap();
}
