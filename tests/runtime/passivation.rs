//! Passivation, on tokio's paused clock: idle actors stop after the idle
//! timeout; past the live maximum the least recently used stop first; a
//! stopped aggregate comes back with the same state; memory follows the
//! live actors, not every aggregate ever touched.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use annals::{Runtime, RuntimeConfig};
use common::{Ledger, LedgerCommand as C, TestStore};

/// Lets the actors run what the clock made due.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn idle_actors_stop_after_the_timeout_and_come_back_the_same() {
    let store = Arc::new(TestStore::new());
    let config = RuntimeConfig::builder()
        .idle_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let runtime = Runtime::new(store.clone(), config);
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("idle", C::Open).await.unwrap();
    handle.execute("idle", C::Deposit(42)).await.unwrap();
    let before = handle.state("idle").await.unwrap();

    tokio::time::sleep(Duration::from_secs(59)).await;
    settle().await;
    assert!(handle.is_live("idle"), "not idle long enough yet");
    handle.execute("idle", C::Note(1)).await.unwrap(); // activity restarts the clock
    tokio::time::sleep(Duration::from_secs(59)).await;
    settle().await;
    assert!(handle.is_live("idle"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert!(!handle.is_live("idle"), "passivated after 60 idle seconds");
    assert_eq!(runtime.live_aggregates(), 0);
    assert_eq!(store.loads_of("ledger-idle"), 1);

    let after = handle.state("idle").await.unwrap();
    assert_eq!(after.balance, before.balance);
    assert_eq!(after.notes, vec![1]);
    assert_eq!(store.loads_of("ledger-idle"), 1, "back from its warm state");
    assert!(handle.is_live("idle"));
    runtime.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn past_the_live_maximum_the_least_recently_used_stop_first() {
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(
        store.clone(),
        RuntimeConfig::builder()
            .max_live_aggregates(3)
            .build()
            .unwrap(),
    );
    let handle = runtime.aggregates::<Ledger>();
    for id in ["a", "b", "c"] {
        handle.execute(id, C::Open).await.unwrap();
    }
    handle.execute("a", C::Deposit(1)).await.unwrap(); // b is now the least recently used
    handle.execute("d", C::Open).await.unwrap();
    settle().await;
    assert!(
        !handle.is_live("b"),
        "the least recently used was passivated"
    );
    for id in ["a", "c", "d"] {
        assert!(handle.is_live(id), "{id} stays live");
    }
    assert_eq!(runtime.live_aggregates(), 3);
    // b comes back with its state; now c is the least recently used.
    handle.execute("b", C::Deposit(7)).await.unwrap();
    settle().await;
    assert!(!handle.is_live("c"));
    assert_eq!(handle.state("b").await.unwrap().balance, 7);
    assert_eq!(store.loads_of("ledger-b"), 1, "back from its warm state");
    runtime.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn memory_follows_the_live_actors() {
    let config = RuntimeConfig::builder()
        .max_live_aggregates(100)
        .idle_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let runtime = Runtime::new(Arc::new(TestStore::new()), config);
    let handle = runtime.aggregates::<Ledger>();
    for id in 0..3000 {
        handle.execute(&id.to_string(), C::Open).await.unwrap();
        if id % 100 == 0 {
            settle().await;
            assert!(
                runtime.live_aggregates() <= 101,
                "{}",
                runtime.live_aggregates()
            );
        }
    }
    settle().await;
    assert!(runtime.live_aggregates() <= 100);
    tokio::time::sleep(Duration::from_secs(31)).await;
    settle().await;
    assert_eq!(runtime.live_aggregates(), 0, "every idle actor stopped");
    // Any of them comes back on demand.
    assert!(handle.state("17").await.unwrap().open);
    runtime.shutdown().await.unwrap();
}

/// An evicted actor leaves nothing running behind: its pending idle check
/// is cancelled, rather than sleeping out the idle timeout while holding
/// the stopped actor's mailboxes (about 7 KB each). Real clock: the point
/// is that nothing waits for the 10-minute timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_actors_leave_no_timer_behind() {
    const TOUCHED: usize = 400;
    let store = Arc::new(TestStore::new());
    let config = RuntimeConfig::builder()
        .idle_timeout(Duration::from_secs(600))
        .max_live_aggregates(20)
        .build()
        .unwrap();
    let runtime = Runtime::new(store.clone(), config);
    let handle = runtime.aggregates::<Ledger>();
    for n in 0..TOUCHED {
        handle
            .execute(&format!("churn-{n}"), C::Open)
            .await
            .unwrap();
    }
    assert!(runtime.live_aggregates() <= 20);
    let metrics = tokio::runtime::Handle::current().metrics();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // Each live actor has its task and its timer's; the evicted ones,
    // nineteen in twenty of those touched, should have neither.
    while metrics.num_alive_tasks() > 100 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        metrics.num_alive_tasks() <= 100,
        "{} tasks alive after {TOUCHED} aggregates, at most 20 live",
        metrics.num_alive_tasks()
    );
    runtime.shutdown().await.unwrap();
}
