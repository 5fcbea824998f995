//! What the runtime offers beyond running commands: projections it owns
//! and stops in order, per-aggregate-type settings, the state returned
//! with a command, command metadata on stored events, the caller's
//! expected version, `try_state`, and the category checks.

use crate::common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use annals::projection::{ProjectionContext, ProjectionError};
use annals::runtime::{AggregateSettings, CategoryError};
use annals::store::ReadDirection;
use annals::{
    Aggregate, CommandContext, CommandError, DomainEvent, EventStore, MemoryStore, Position,
    Projection, ProjectionConfig, QueryError, RecordedEvent, Runtime, RuntimeConfig, SledStore,
    StreamId, Version,
};
use common::{Ledger, LedgerCommand as C, TestStore};
use serde::{Deserialize, Serialize};

/// Counts the events it handled.
struct Count(Arc<AtomicU64>);

impl Projection for Count {
    async fn handle(
        &mut self,
        _: &RecordedEvent,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A second aggregate type; its category is given by `CATEGORY`.
macro_rules! tally {
    ($name:ident, $category:literal) => {
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        struct $name {
            count: u64,
        }

        impl Aggregate for $name {
            type Command = ();
            type Event = Ticked;
            type Error = std::convert::Infallible;
            const CATEGORY: &'static str = $category;

            fn handle(&self, (): &()) -> Result<Vec<Ticked>, std::convert::Infallible> {
                Ok(vec![Ticked::Once])
            }

            fn apply(&mut self, _: &Ticked) {
                self.count += 1;
            }
        }
    };
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Ticked {
    Once,
}
impl DomainEvent for Ticked {}

tally!(Tally, "tally");
tally!(Dashed, "tally-dashed");
tally!(LedgerTwin, "ledger");

async fn run_ledger_commands(runtime: &Runtime<SledStore>, ledgers: u64) {
    let handle = runtime.aggregates::<Ledger>();
    let mut tasks = Vec::new();
    for ledger in 0..ledgers {
        let handle = handle.clone();
        tasks.push(tokio::spawn(async move {
            let id = ledger.to_string();
            handle.execute(&id, C::Open).await.unwrap();
            for amount in 1..=5 {
                handle.execute(&id, C::Deposit(amount)).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_catches_a_started_projection_up_and_checkpoints_it_before_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::open(dir.path()).unwrap();
    let counted = Arc::new(AtomicU64::new(0));
    let projection = runtime
        .start_projection(
            ProjectionConfig::builder("count").build().unwrap(),
            Count(Arc::clone(&counted)),
        )
        .await
        .unwrap();
    run_ledger_commands(&runtime, 16).await;
    let head = runtime.store().head_position();
    assert_eq!(head, Position(16 * 6));

    runtime.shutdown().await.unwrap();
    assert_eq!(
        counted.load(Ordering::SeqCst),
        head.0,
        "caught up to the last commit"
    );
    // Stopped by the runtime before the store: shutting it down again
    // answers the checkpoint the runtime's shutdown saved, not `Closed`.
    assert_eq!(projection.shutdown().await.unwrap(), head);
    assert!(runtime
        .start_projection(
            ProjectionConfig::builder("late").build().unwrap(),
            Count(Arc::default())
        )
        .await
        .is_err());
    assert!(
        runtime.adopt(projection.clone()).is_err(),
        "adopting after shutdown is refused"
    );
    drop((projection, runtime));

    let store = common::reopen_sled(dir.path()).await;
    assert_eq!(store.load_checkpoint("count").await.unwrap(), Some(head));
    store.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_projection_is_stopped_before_the_store() {
    let store = Arc::new(MemoryStore::new());
    let runtime = Runtime::new(Arc::clone(&store), RuntimeConfig::default());
    let counted = Arc::new(AtomicU64::new(0));
    let projection = annals::ProjectionHandle::spawn(
        store.clone(),
        ProjectionConfig::builder("adopted").build().unwrap(),
        Count(Arc::clone(&counted)),
    )
    .await
    .unwrap();
    runtime.adopt(projection.clone()).unwrap();
    let tallies = runtime.aggregates::<Tally>();
    for _ in 0..50 {
        tallies.execute("1", ()).await.unwrap();
    }
    runtime.shutdown().await.unwrap();
    assert_eq!(counted.load(Ordering::SeqCst), 50);
    assert_eq!(projection.shutdown().await.unwrap(), Position(50));
}

/// `SledStore::shutdown` releases sled's handles, so the directory is free
/// while the shut-down runtime (and its store handle) is still alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_reopens_in_the_same_process_right_after_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::open(dir.path()).unwrap();
    let projection = runtime
        .start_projection(
            ProjectionConfig::builder("count").build().unwrap(),
            Count(Arc::default()),
        )
        .await
        .unwrap();
    run_ledger_commands(&runtime, 4).await;
    let head = runtime.store().head_position();
    runtime.shutdown().await.unwrap();
    // The runtime and the projection's handle are still alive.
    let reopened =
        SledStore::open(dir.path()).expect("the directory is free once shutdown returned");
    assert_eq!(reopened.head_position(), head);
    assert_eq!(reopened.load_checkpoint("count").await.unwrap(), Some(head));
    reopened.shutdown().await.unwrap();
    drop((projection, runtime));
}

#[tokio::test]
async fn per_type_settings_override_the_runtime_defaults() {
    tokio::time::pause();
    let store = Arc::new(TestStore::new());
    let config = RuntimeConfig::builder()
        .snapshot_every(0)
        .idle_timeout(Duration::from_secs(3600))
        .aggregate::<Ledger>(AggregateSettings::new().snapshot_every(2))
        .aggregate::<Tally>(AggregateSettings::new().idle_timeout(Duration::from_secs(1)))
        .build()
        .unwrap();
    assert_eq!(
        config.aggregate::<Ledger>().snapshot_every_setting(),
        Some(2)
    );
    assert_eq!(
        config.aggregate::<Tally>().snapshot_every_setting(),
        Some(0)
    );
    let runtime = Runtime::new(Arc::clone(&store), config);
    let ledgers = runtime.aggregates::<Ledger>();
    let tallies = runtime.aggregates::<Tally>();
    ledgers.execute("1", C::Open).await.unwrap();
    for amount in 1..=3 {
        ledgers.execute("1", C::Deposit(amount)).await.unwrap();
        tallies.execute("1", ()).await.unwrap();
    }
    tallies.execute("1", ()).await.unwrap();

    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !tallies.is_live("1"),
        "Tally's own idle timeout (1 s) passivated it"
    );
    assert!(
        ledgers.is_live("1"),
        "Ledger keeps the runtime's idle timeout (1 h)"
    );
    let ledger_snapshot = store
        .load_snapshot(&StreamId::new("ledger-1").unwrap())
        .await
        .unwrap();
    assert_eq!(ledger_snapshot.map(|s| s.version), Some(Version(4)));
    let tally_snapshot = store
        .load_snapshot(&StreamId::new("tally-1").unwrap())
        .await
        .unwrap();
    assert!(
        tally_snapshot.is_none(),
        "Tally keeps the runtime's snapshot_every(0)"
    );
    runtime.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_returned_with_a_command_equals_state() {
    let runtime = Runtime::new(Arc::new(MemoryStore::new()), RuntimeConfig::default());
    let ledgers = runtime.aggregates::<Ledger>();
    assert!(
        ledgers.execute("1", C::Open).await.unwrap().state.is_none(),
        "only when asked"
    );
    for amount in [5, 7, 11] {
        let executed = ledgers
            .execute_returning_state("1", C::DepositTwice(amount))
            .await
            .unwrap();
        let returned = executed.state.expect("asked for the state");
        assert_eq!(returned.events, executed.version.0);
        assert_eq!(returned, ledgers.state("1").await.unwrap());
    }
    let refused_nothing = ledgers
        .execute_with("1", C::Nothing, CommandContext::default().returning_state())
        .await
        .unwrap();
    assert_eq!(refused_nothing.state.unwrap().balance, 46);
    runtime.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_metadata_is_stored_on_every_event_of_the_command() {
    let store = Arc::new(MemoryStore::new());
    let runtime = Runtime::new(Arc::clone(&store), RuntimeConfig::default());
    let ledgers = runtime.aggregates::<Ledger>();
    ledgers.execute("1", C::Open).await.unwrap();
    let context = CommandContext::default()
        .with_metadata("user", "alice")
        .with_metadata("tenant", "t-1");
    ledgers
        .execute_with("1", C::DepositTwice(3), context)
        .await
        .unwrap();
    let stored = store
        .read_stream(
            &StreamId::new("ledger-1").unwrap(),
            Version::FIRST,
            ReadDirection::Forward,
            10,
        )
        .await
        .unwrap();
    assert_eq!(stored.len(), 3);
    assert!(stored[0].metadata.extra.is_empty());
    for event in &stored[1..] {
        assert_eq!(
            event.metadata.extra.get("user").map(String::as_str),
            Some("alice")
        );
        assert_eq!(
            event.metadata.extra.get("tenant").map(String::as_str),
            Some("t-1")
        );
        assert_eq!(event.metadata.extra.len(), 2);
    }
    let bad_key = ledgers
        .execute_with(
            "1",
            C::Deposit(1),
            CommandContext::default().with_metadata("", "x"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(bad_key, CommandError::InvalidInput(_)),
        "{bad_key}"
    );
    assert_eq!(
        store
            .stream_version(&StreamId::new("ledger-1").unwrap())
            .await
            .unwrap(),
        Version(3)
    );
    runtime.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expected_version_the_stream_moved_past_is_a_conflict_that_writes_nothing() {
    let store = Arc::new(MemoryStore::new());
    let runtime = Runtime::new(Arc::clone(&store), RuntimeConfig::default());
    let ledgers = runtime.aggregates::<Ledger>();
    let stream = StreamId::new("ledger-1").unwrap();
    let at = |version| CommandContext::default().expecting(Version(version));
    ledgers.execute_with("1", C::Open, at(0)).await.unwrap();
    ledgers.execute("1", C::Deposit(5)).await.unwrap();

    let stale = ledgers
        .execute_with("1", C::Deposit(1), at(1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            stale,
            CommandError::WrongExpectedVersion {
                expected: Version(1),
                actual: Version(2),
                ..
            }
        ),
        "{stale}"
    );
    let ahead = ledgers
        .execute_with("1", C::Deposit(1), at(9))
        .await
        .unwrap_err();
    assert!(matches!(
        ahead,
        CommandError::WrongExpectedVersion {
            expected: Version(9),
            actual: Version(2),
            ..
        }
    ));
    assert_eq!(store.stream_version(&stream).await.unwrap(), Version(2));

    // Another runtime (another process) moves the stream: this runtime's
    // actor still believes version 2, and the append itself conflicts.
    let other = Runtime::new(Arc::clone(&store), RuntimeConfig::default());
    other
        .aggregates::<Ledger>()
        .execute("1", C::Deposit(10))
        .await
        .unwrap();
    let moved = ledgers
        .execute_with("1", C::Deposit(1), at(2))
        .await
        .unwrap_err();
    assert!(
        matches!(
            moved,
            CommandError::WrongExpectedVersion {
                expected: Version(2),
                actual: Version(3),
                ..
            }
        ),
        "{moved}"
    );
    // A refusal decided on a stale state is a conflict too, not a refusal.
    let refused = ledgers
        .execute_with("1", C::Withdraw(1000), at(1))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, CommandError::WrongExpectedVersion { .. }),
        "{refused}"
    );
    assert_eq!(store.stream_version(&stream).await.unwrap(), Version(3));

    let done = ledgers
        .execute_with("1", C::Deposit(1), at(3))
        .await
        .unwrap();
    assert_eq!(done.version, Version(4));
    assert_eq!(ledgers.state("1").await.unwrap().balance, 16);
    other.shutdown().await.unwrap();
    runtime.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_commands_expecting_one_version_commit_exactly_once() {
    let store = Arc::new(MemoryStore::new());
    let runtimes: Vec<_> = (0..2)
        .map(|_| Runtime::new(Arc::clone(&store), RuntimeConfig::default()))
        .collect();
    runtimes[0]
        .aggregates::<Ledger>()
        .execute("1", C::Open)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for task in 0..32u64 {
        let ledgers = runtimes[(task % 2) as usize].aggregates::<Ledger>();
        tasks.push(tokio::spawn(async move {
            ledgers
                .execute_with(
                    "1",
                    C::Deposit(task + 1),
                    CommandContext::default().expecting(Version(1)),
                )
                .await
        }));
    }
    let mut committed = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(executed) => {
                assert_eq!(executed.version, Version(2));
                committed += 1;
            }
            Err(CommandError::WrongExpectedVersion {
                expected, actual, ..
            }) => {
                assert_eq!((expected, actual), (Version(1), Version(2)));
            }
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(committed, 1);
    assert_eq!(
        store
            .stream_version(&StreamId::new("ledger-1").unwrap())
            .await
            .unwrap(),
        Version(2)
    );
    for runtime in runtimes {
        runtime.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_state_is_none_for_a_stream_without_events_and_starts_no_actor() {
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(Arc::clone(&store), RuntimeConfig::default());
    let ledgers = runtime.aggregates::<Ledger>();
    assert_eq!(ledgers.try_state("new").await.unwrap(), None);
    assert_eq!(runtime.live_aggregates(), 0);
    assert!(!ledgers.is_live("new"));
    assert_eq!(store.loads_of("ledger-new"), 0, "no recovery ran");

    // A stream with events, not live: recovered, and the same as `state`.
    common::outside_append(&*store, "ledger-old", common::LedgerEvent::Opened).await;
    let old = ledgers
        .try_state("old")
        .await
        .unwrap()
        .expect("it has an event");
    assert!(old.open);
    assert_eq!(Some(old), Some(ledgers.state("old").await.unwrap()));

    // A live actor answers; one started on an empty stream still says None.
    ledgers.execute("live", C::Open).await.unwrap();
    let loads = store.loads_of("ledger-live");
    assert_eq!(
        ledgers.try_state("live").await.unwrap(),
        Some(ledgers.state("live").await.unwrap())
    );
    assert_eq!(
        store.loads_of("ledger-live"),
        loads,
        "the live actor answered"
    );
    ledgers.state("empty").await.unwrap();
    assert!(ledgers.is_live("empty"));
    assert_eq!(ledgers.try_state("empty").await.unwrap(), None);
    assert!(matches!(
        ledgers.try_state("").await,
        Err(QueryError::InvalidInput(_))
    ));
    runtime.shutdown().await.unwrap();
    assert!(matches!(
        ledgers.try_state("new").await,
        Err(QueryError::ShutDown)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_categories_are_refused_when_the_type_is_first_used() {
    let store = Arc::new(MemoryStore::new());
    let runtime = Runtime::new(Arc::clone(&store), RuntimeConfig::default());

    let dashed = runtime.try_aggregates::<Dashed>().unwrap_err();
    assert!(
        matches!(
            dashed,
            CategoryError::ContainsSeparator {
                category: "tally-dashed",
                ..
            }
        ),
        "{dashed}"
    );
    let refused = runtime
        .aggregates::<Dashed>()
        .execute("1", ())
        .await
        .unwrap_err();
    assert!(matches!(
        refused,
        CommandError::Category(CategoryError::ContainsSeparator { .. })
    ));
    assert!(matches!(
        runtime.aggregates::<Dashed>().state("1").await,
        Err(QueryError::Category(_))
    ));

    runtime
        .aggregates::<Ledger>()
        .execute("1", C::Open)
        .await
        .unwrap();
    let twin = runtime.try_aggregates::<LedgerTwin>().unwrap_err();
    match &twin {
        CategoryError::Shared {
            category,
            registered,
            refused,
        } => {
            assert_eq!(*category, "ledger");
            assert!(registered.ends_with("Ledger"), "{registered}");
            assert!(refused.ends_with("LedgerTwin"), "{refused}");
        }
        other => panic!("{other}"),
    }
    let refused = runtime
        .aggregates::<LedgerTwin>()
        .execute("1", ())
        .await
        .unwrap_err();
    assert!(matches!(
        refused,
        CommandError::Category(CategoryError::Shared { .. })
    ));
    assert!(
        runtime.try_aggregates::<Ledger>().is_ok(),
        "the first type keeps its category"
    );
    assert_eq!(
        store.head_position(),
        Position(1),
        "nothing of the refused types stored"
    );
    assert_eq!(runtime.live_aggregates(), 1);

    // Per runtime: another runtime may give the category to the twin.
    let other = Runtime::new(Arc::clone(&store), RuntimeConfig::default());
    assert!(other.try_aggregates::<LedgerTwin>().is_ok());
    other.shutdown().await.unwrap();
    runtime.shutdown().await.unwrap();
}
