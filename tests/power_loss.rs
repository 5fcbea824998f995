//! Power loss (invariant I1): a killed process leaves the page cache, a power
//! cut does not, so every acknowledgement under the default durability must
//! be preceded by an fdatasync of the log. These tests fail if the durable
//! mode stops syncing, or if a group commit answers before its sync.

use std::sync::Arc;

use annals::store::{Durability, SledStoreConfig};
use annals::{EventStore, ExpectedVersion, NewEvent, SledStore, StreamId};

fn event() -> Vec<NewEvent> {
    vec![NewEvent::new("Happened", vec![7; 64])]
}

#[tokio::test]
async fn every_sequential_append_waits_for_its_own_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let stream = StreamId::new("power-1").unwrap();
    for n in 1..=20u64 {
        store
            .append(&stream, ExpectedVersion::Any, event())
            .await
            .unwrap();
        // One append at a time: each acknowledgement needed a sync of its own.
        let stats = store.stats();
        assert_eq!(stats.group_commits, n);
        assert!(
            stats.durable_syncs >= n,
            "append {n} acknowledged before its fdatasync: {stats:?}"
        );
    }
    store.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_syncs_but_none_skips_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let stream = StreamId::new(format!("power-{i}")).unwrap();
                store
                    .append(&stream, ExpectedVersion::NoStream, event())
                    .await
                    .unwrap();
                // This append's group was synced before it was answered.
                store.stats().durable_syncs
            })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap() >= 1);
    }
    let stats = store.stats();
    assert_eq!(stats.appends, 200);
    assert!(stats.durable_syncs >= stats.group_commits, "{stats:?}");
    assert!(
        stats.group_commits < 200,
        "no group commit shared a sync: {stats:?}"
    );
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_weaker_modes_do_not_claim_syncs() {
    for durability in [
        Durability::Flush,
        Durability::Buffered { flush_every_ms: 50 },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SledStore::open_with(SledStoreConfig::new(dir.path()).durability(durability)).unwrap();
        let stream = StreamId::new("power-weak").unwrap();
        store
            .append(&stream, ExpectedVersion::Any, event())
            .await
            .unwrap();
        assert_eq!(store.stats().durable_syncs, 0, "{durability:?}");
        store.shutdown().await.unwrap();
    }
}
