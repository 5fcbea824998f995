//! Shutdown and opening: `Runtime::open` runs on sled at a path;
//! `shutdown` lets accepted commands finish, then refuses new ones, stops
//! every actor and shuts the store down.

use crate::common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use annals::{CommandError, QueryError, Runtime, RuntimeConfig, StreamId, Version};
use common::{Ledger, LedgerCommand as C, TestStore};
use tokio::sync::Semaphore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_runs_on_sled_and_shutdown_keeps_what_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::open(dir.path()).unwrap();
    assert_eq!(runtime.config().snapshot_every(), 100);
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("1", C::Open).await.unwrap();
    handle.execute("1", C::Deposit(5)).await.unwrap();
    runtime.shutdown().await.unwrap();
    runtime.shutdown().await.unwrap(); // twice is fine
    assert!(matches!(
        handle.execute("1", C::Deposit(1)).await,
        Err(CommandError::ShutDown)
    ));
    assert!(matches!(handle.state("1").await, Err(QueryError::ShutDown)));
    assert_eq!(runtime.live_aggregates(), 0);
    drop((handle, runtime));

    let store = common::reopen_sled(dir.path()).await;
    let runtime = Runtime::new(Arc::new(store), RuntimeConfig::default());
    assert_eq!(
        runtime
            .aggregates::<Ledger>()
            .state("1")
            .await
            .unwrap()
            .balance,
        5
    );
    runtime.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_accepted_commands_finish() {
    let gate = Arc::new(Semaphore::new(1));
    let store = Arc::new(TestStore::gated(gate.clone()));
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("s", C::Open).await.unwrap();
    let running = tokio::spawn({
        let handle = handle.clone();
        async move { handle.execute("s", C::Deposit(3)).await }
    });
    while store.appends.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let shutdown = tokio::spawn({
        let runtime = runtime.clone();
        async move { runtime.shutdown().await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        !shutdown.is_finished(),
        "shutdown waits for the running command"
    );
    assert!(matches!(
        handle.execute("s", C::Deposit(1)).await,
        Err(CommandError::ShutDown)
    ));
    gate.add_permits(10);
    assert_eq!(running.await.unwrap().unwrap().version, Version(2));
    shutdown.await.unwrap().unwrap();
    let stream = StreamId::new("ledger-s").unwrap();
    assert_eq!(
        annals::EventStore::stream_version(&*store, &stream)
            .await
            .unwrap(),
        Version(2)
    );
}
