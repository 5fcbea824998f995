//! Recovery: an aggregate comes back from its latest snapshot plus the
//! events after it (and only those), equal to a full replay; a snapshot that
//! no longer decodes is ignored with a warning; snapshots are only a cache.

use crate::common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use annals::runtime::RuntimeStore;
use annals::store::Snapshot;
use annals::{EventStore, Runtime, RuntimeConfig, StreamId, Version};
use common::{Ledger, LedgerCommand as C, TestStore};
use tracing_subscriber::layer::SubscriberExt;

async fn fill(runtime: &Runtime<impl RuntimeStore + ?Sized>, id: &str, deposits: u64) {
    let handle = runtime.aggregates::<Ledger>();
    handle.execute(id, C::Open).await.unwrap();
    for amount in 1..=deposits {
        handle.execute(id, C::Deposit(amount)).await.unwrap();
    }
}

/// Waits for the background snapshot save of `stream` to reach `version`.
async fn snapshot_reaches(store: &dyn EventStore, stream: &str, version: u64) -> Snapshot {
    let stream = StreamId::new(stream).unwrap();
    for _ in 0..1000 {
        if let Some(snapshot) = store.load_snapshot(&stream).await.unwrap() {
            if snapshot.version.0 >= version {
                return snapshot;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    panic!("no snapshot at version {version}");
}

#[tokio::test]
async fn recovery_replays_only_the_events_after_the_snapshot() {
    let store = Arc::new(TestStore::new());
    let config = RuntimeConfig::builder().snapshot_every(50).build().unwrap();
    let runtime = Runtime::new(store.clone(), config.clone());
    fill(&runtime, "s", 129).await; // 130 events: snapshots at 50 and 100
    let snapshot = snapshot_reaches(&*store, "ledger-s", 100).await;
    assert_eq!(snapshot.version, Version(100));
    let live = runtime.aggregates::<Ledger>().state("s").await.unwrap();

    // A second runtime on the same store recovers from the snapshot at 100.
    store.events_read.store(0, Ordering::SeqCst);
    let runtime = Runtime::new(store.clone(), config);
    let recovered = runtime.aggregates::<Ledger>().state("s").await.unwrap();
    assert_eq!(recovered, live);
    assert_eq!(recovered.balance, (1..=129).sum::<u64>());
    assert_eq!(
        store.events_read.load(Ordering::SeqCst),
        30,
        "only the tail is replayed"
    );
}

#[tokio::test]
async fn state_from_snapshots_equals_state_from_full_replay() {
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(
        store.clone(),
        RuntimeConfig::builder().snapshot_every(7).build().unwrap(),
    );
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("r", C::Open).await.unwrap();
    for i in 0..120u64 {
        let command = match i % 4 {
            0 => C::Deposit(i),
            1 => C::Note(i),
            2 => C::Withdraw(i / 2),
            _ => C::DepositTwice(i),
        };
        let _ = handle.execute("r", command).await;
    }
    let live = handle.state("r").await.unwrap();
    let stream = StreamId::new("ledger-r").unwrap();
    let version = store.stream_version(&stream).await.unwrap();
    assert!(
        snapshot_reaches(&*store, "ledger-r", version.0 - 7)
            .await
            .version
            > Version(1)
    );

    // With the snapshot: a fresh runtime over the same events.
    let with_snapshot = Runtime::new(store.clone(), RuntimeConfig::default());
    assert_eq!(
        with_snapshot
            .aggregates::<Ledger>()
            .state("r")
            .await
            .unwrap(),
        live
    );
    // Without it: I5, deleting every snapshot changes no state.
    store.delete_snapshot(&stream).await.unwrap();
    let without = Runtime::new(
        store.clone(),
        RuntimeConfig::builder().snapshot_every(0).build().unwrap(),
    );
    assert_eq!(
        without.aggregates::<Ledger>().state("r").await.unwrap(),
        live
    );
    assert_eq!(handle.state_at("r", version).await.unwrap(), live);
}

/// Records the messages of WARN events.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::WARN {
            let mut text = String::new();
            event.record(
                &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                    text.push_str(&format!("{}={:?} ", field.name(), value));
                },
            );
            self.0.lock().unwrap().push(text);
        }
    }
}

// Current-thread runtime: the actors run on this thread, under the
// thread-local subscriber that collects warnings.
#[tokio::test(flavor = "current_thread")]
async fn an_undecodable_snapshot_is_ignored_with_a_warning() {
    let warnings = Warnings::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(
        store.clone(),
        RuntimeConfig::builder().snapshot_every(0).build().unwrap(),
    );
    fill(&runtime, "u", 9).await;
    let expected = runtime.aggregates::<Ledger>().state("u").await.unwrap();
    // Dropped, not shut down: shutting down would close the store, which
    // then refuses the snapshots planted below.
    drop(runtime);
    assert!(warnings.0.lock().unwrap().is_empty());

    // The state type changed since this snapshot was written: its bytes do
    // not decode as a Ledger.
    let stream = StreamId::new("ledger-u").unwrap();
    let garbage = Snapshot {
        version: Version(5),
        payload: vec![0xff; 3],
    };
    store.inner.save_snapshot(&stream, garbage).await.unwrap();
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    assert_eq!(
        runtime.aggregates::<Ledger>().state("u").await.unwrap(),
        expected
    );
    let warned = warnings.0.lock().unwrap().clone();
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(warned[0].contains("snapshot does not decode"), "{warned:?}");

    // A snapshot ahead of the stream (from another store) is ignored too.
    let ahead = Snapshot {
        version: Version(500),
        payload: annals::codec::encode_value(&Ledger::default()).unwrap(),
    };
    store.inner.save_snapshot(&stream, ahead).await.unwrap();
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    assert_eq!(
        runtime.aggregates::<Ledger>().state("u").await.unwrap(),
        expected
    );
    assert!(warnings.0.lock().unwrap()[1].contains("ahead of the stream"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_recovery_across_restarts_with_and_without_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let open = |every| {
        let path = path.clone();
        async move {
            let store = Arc::new(common::reopen_sled(&path).await);
            Runtime::new(
                store,
                RuntimeConfig::builder()
                    .snapshot_every(every)
                    .build()
                    .unwrap(),
            )
        }
    };
    let runtime = open(10).await;
    fill(&runtime, "d", 54).await; // 55 events, snapshot at 50
    let before = runtime.aggregates::<Ledger>().state("d").await.unwrap();
    runtime.shutdown().await.unwrap(); // waits for the snapshot in flight
    drop(runtime);

    let runtime = open(10).await;
    // Read on the reopened store: a shut-down sled store refuses reads.
    let stream = StreamId::new("ledger-d").unwrap();
    let snapshot = runtime
        .store()
        .load_snapshot(&stream)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snapshot.version, Version(50));
    let handle = runtime.aggregates::<Ledger>();
    assert_eq!(handle.state("d").await.unwrap(), before);
    handle.execute("d", C::Deposit(1000)).await.unwrap();
    drop(handle);
    // Before the shutdown, which closes the store to snapshot writes; the
    // actor saves none at version 56 (the next is due at 60).
    runtime.store().delete_snapshot(&stream).await.unwrap();
    runtime.shutdown().await.unwrap();
    assert_eq!(
        Arc::strong_count(runtime.store()),
        2,
        "no actor holds the store, only the runtime's typed and dyn handles"
    );
    drop(runtime);

    let runtime = open(0).await;
    let after = runtime.aggregates::<Ledger>().state("d").await.unwrap();
    assert_eq!(after.balance, before.balance + 1000);
    assert_eq!(after.events, 56);
    runtime.shutdown().await.unwrap();
}

/// When recovery fails (here: an event no longer decodes), every command
/// that was waiting for that recovery gets its error; they do not each
/// replay the stream again in turn. A command after the failure tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_waiting_for_a_failed_recovery_share_its_error() {
    const WAITING: usize = 24;
    let store = Arc::new(TestStore {
        load_delay: Some(std::time::Duration::from_millis(100)),
        ..TestStore::new()
    });
    let stream = StreamId::new("ledger-broken").unwrap();
    store
        .inner
        .append(
            &stream,
            annals::ExpectedVersion::Any,
            vec![annals::NewEvent::new("RenamedSinceThen", vec![1, 2, 3])],
        )
        .await
        .unwrap();
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let ledgers = runtime.aggregates::<Ledger>();
    let waiting: Vec<_> = (0..WAITING)
        .map(|n| {
            let ledgers = ledgers.clone();
            tokio::spawn(async move { ledgers.execute("broken", C::Deposit(n as u64 + 1)).await })
        })
        .collect();
    for command in waiting {
        match command.await.unwrap() {
            Err(annals::CommandError::Codec(annals::codec::CodecError::UnknownEventType {
                event_type,
                ..
            })) => assert_eq!(event_type, "RenamedSinceThen"),
            other => panic!("expected the recovery's codec error, got {other:?}"),
        }
    }
    // The commands arrived within the first recovery's 100 ms; a few late
    // starters may have queued on a second one, but not one per command.
    let recoveries = store.loads_of("ledger-broken");
    assert!(
        recoveries <= 3,
        "{recoveries} recoveries for {WAITING} commands waiting on one"
    );
    // A later command is not answered from the cache: it recovers again.
    assert!(ledgers.execute("broken", C::Open).await.is_err());
    assert_eq!(store.loads_of("ledger-broken"), recoveries + 1);
}

/// An aggregate whose snapshot never decodes: its `Deserialize` panics, a
/// failure of recovery outside `apply` that ractor reports as a failed
/// start rather than as the runtime's own load error.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Doomed;

impl<'de> serde::Deserialize<'de> for Doomed {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        panic!("snapshot Deserialize panicked on purpose")
    }
}

impl annals::Aggregate for Doomed {
    type Command = C;
    type Event = common::LedgerEvent;
    type Error = common::LedgerError;
    const CATEGORY: &'static str = "doomed";

    fn handle(&self, _: &C) -> Result<Vec<common::LedgerEvent>, common::LedgerError> {
        Ok(vec![])
    }

    fn apply(&mut self, _: &common::LedgerEvent) {}
}

#[tokio::test]
async fn commands_waiting_for_a_recovery_that_panicked_share_its_error() {
    const WAITING: usize = 24;
    let store = Arc::new(TestStore {
        load_delay: Some(std::time::Duration::from_millis(100)),
        ..TestStore::new()
    });
    let stream = StreamId::new("doomed-1").unwrap();
    common::outside_append(&store.inner, "doomed-1", common::LedgerEvent::Opened).await;
    store
        .inner
        .save_snapshot(
            &stream,
            Snapshot {
                version: Version(1),
                payload: vec![0],
            },
        )
        .await
        .unwrap();
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let doomed = runtime.aggregates::<Doomed>();
    let waiting: Vec<_> = (0..WAITING)
        .map(|_| {
            let doomed = doomed.clone();
            tokio::spawn(async move { doomed.execute("1", C::Nothing).await })
        })
        .collect();
    for command in waiting {
        match command.await.unwrap() {
            Err(annals::CommandError::AggregatePanicked { message, .. }) => assert!(
                message.contains("on purpose"),
                "the recovery's panic, not {message}"
            ),
            other => panic!("expected the recovery's panic, got {other:?}"),
        }
    }
    let recoveries = store.loads_of("doomed-1");
    assert!(
        recoveries <= 3,
        "{recoveries} recoveries for {WAITING} commands waiting on one"
    );
    // A later command is not answered from the cache: it recovers again.
    assert!(doomed.execute("1", C::Nothing).await.is_err());
    assert_eq!(store.loads_of("doomed-1"), recoveries + 1);
}
