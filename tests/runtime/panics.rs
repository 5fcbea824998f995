//! Panics in the user's code: the caller gets a typed error at once, nothing
//! of the command is stored, the actor is replaced and the aggregate reloads
//! from the store, other aggregates do not notice, and a stream that panics
//! on every load fails each command without a restart loop.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use annals::{CommandError, EventStore, QueryError, Runtime, RuntimeConfig, StreamId, Version};
use common::{outside_append, Ledger, LedgerCommand as C, LedgerEvent, TestStore};
use tokio::time::timeout;

const PROMPTLY: Duration = Duration::from_secs(5);

fn quiet_panics() {
    // The panics below are on purpose; keep the test output readable. Only
    // those: the hook is the whole binary's, and other tests' panics (their
    // failures) must still be shown, by whatever hook was there before.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or_default();
            if !message.contains("on purpose") {
                previous(info);
            }
        }));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_handle_fails_the_command_and_the_actor_reloads() {
    quiet_panics();
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("p", C::Open).await.unwrap();
    handle.execute("p", C::Deposit(10)).await.unwrap();
    handle.execute("calm", C::Open).await.unwrap();
    assert_eq!(store.loads_of("ledger-p"), 1);

    let error = timeout(PROMPTLY, handle.execute("p", C::PanicInHandle))
        .await
        .unwrap()
        .unwrap_err();
    match error {
        CommandError::AggregatePanicked { stream, message } => {
            assert_eq!(stream.as_str(), "ledger-p");
            assert_eq!(message, "handle panicked on purpose");
        }
        other => panic!("{other}"),
    }
    // The next command is served by a new actor that reloaded the stream.
    let executed = handle.execute("p", C::Deposit(5)).await.unwrap();
    assert_eq!(executed.version, Version(3));
    assert_eq!(
        store.loads_of("ledger-p"),
        2,
        "a fresh actor recovered the stream"
    );
    assert_eq!(handle.state("p").await.unwrap().balance, 15);
    // The other aggregate kept its actor.
    handle.execute("calm", C::Deposit(1)).await.unwrap();
    assert_eq!(store.loads_of("ledger-calm"), 1);
    runtime.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_panics_in_apply_is_never_stored() {
    quiet_panics();
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("q", C::Open).await.unwrap();
    let error = timeout(PROMPTLY, handle.execute("q", C::EmitPoison))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&error, CommandError::AggregatePanicked { message, .. } if message == "apply panicked on purpose"),
        "{error}"
    );
    let stream = StreamId::new("ledger-q").unwrap();
    assert_eq!(store.stream_version(&stream).await.unwrap(), Version(1));
    // The stream stays loadable: the new actor serves the next command.
    assert_eq!(
        handle.execute("q", C::Deposit(3)).await.unwrap().version,
        Version(2)
    );
    runtime.shutdown().await.unwrap();
}

// Current-thread: all the commands are in the actor's mailbox before it
// runs, so those behind the panic are really queued when it retires.
#[tokio::test(flavor = "current_thread")]
async fn commands_queued_behind_a_panic_go_to_the_replacement_actor() {
    quiet_panics();
    let runtime = Runtime::new(Arc::new(TestStore::new()), RuntimeConfig::default());
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("b", C::Open).await.unwrap();
    // One future per command, sent in this order on their first poll.
    let mut commands = vec![C::Deposit(1), C::PanicInHandle];
    commands.extend((0..50).map(|_| C::Deposit(1)));
    let results =
        futures::future::join_all(commands.into_iter().map(|c| handle.execute("b", c))).await;
    let panicked = results
        .iter()
        .filter(|r| matches!(r, Err(CommandError::AggregatePanicked { .. })))
        .count();
    let deposited = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(
        (panicked, deposited),
        (1, 51),
        "only the panicking command fails"
    );
    assert_eq!(handle.state("b").await.unwrap().balance, 51);
    runtime.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_panics_on_load_fails_each_command_without_a_restart_loop() {
    quiet_panics();
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("x", C::Open).await.unwrap();
    handle.execute("ok", C::Open).await.unwrap();
    // Another writer stores an event this code cannot apply (a bug).
    outside_append(&*store, "ledger-x", LedgerEvent::Poisoned).await;

    // The live actor meets it while catching up after the conflict.
    let error = timeout(PROMPTLY, handle.execute("x", C::Deposit(1)))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(error, CommandError::AggregatePanicked { .. }),
        "{error}"
    );
    // Every later command fails the same way, each after one reload only.
    for attempt in 1..=3 {
        let error = timeout(PROMPTLY, handle.execute("x", C::Deposit(1)))
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(error, CommandError::AggregatePanicked { .. }),
            "{error}"
        );
        assert_eq!(store.loads_of("ledger-x"), 1 + attempt);
    }
    let query = handle.state("x").await.unwrap_err();
    assert!(
        matches!(query, QueryError::AggregatePanicked { .. }),
        "{query}"
    );
    // No actor is left for the broken stream, nothing respawns it on its own.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!handle.is_live("x"));
    assert_eq!(store.loads_of("ledger-x"), 5);
    // Its neighbour never noticed.
    assert_eq!(
        handle.execute("ok", C::Deposit(2)).await.unwrap().version,
        Version(2)
    );
    assert_eq!(runtime.live_aggregates(), 1);
    runtime.shutdown().await.unwrap();
}

/// A state whose `Serialize` panics once it holds two or more: snapshots of
/// it fail after the command's append has already committed.
#[derive(Clone, Debug, Default, serde::Deserialize)]
struct Tally {
    count: u64,
}

impl serde::Serialize for Tally {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        assert!(self.count < 2, "Serialize panicked on purpose");
        serializer.serialize_u64(self.count)
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
enum TallyEvent {
    Added,
}

impl annals::DomainEvent for TallyEvent {}

impl annals::Aggregate for Tally {
    type Command = ();
    type Event = TallyEvent;
    type Error = std::convert::Infallible;
    const CATEGORY: &'static str = "tally";

    fn handle(&self, _: &()) -> Result<Vec<TallyEvent>, std::convert::Infallible> {
        Ok(vec![TallyEvent::Added])
    }

    fn apply(&mut self, _: &TallyEvent) {
        self.count += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_snapshot_never_reports_a_committed_command_as_failed() {
    quiet_panics();
    let store: Arc<dyn EventStore> = Arc::new(annals::MemoryStore::new());
    let config = RuntimeConfig::builder().snapshot_every(1).build().unwrap();
    let runtime = Runtime::new(Arc::clone(&store), config);
    let tallies = runtime.aggregates::<Tally>();
    for expected in 1..=4u64 {
        // Snapshots from the second command on panic in Serialize.
        let executed = timeout(PROMPTLY, tallies.execute("t", ()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(executed.version, Version(expected));
    }
    let stream = StreamId::new("tally-t").unwrap();
    assert_eq!(store.stream_version(&stream).await.unwrap(), Version(4));
    assert_eq!(tallies.state("t").await.unwrap().count, 4);
    runtime.shutdown().await.unwrap();
}
