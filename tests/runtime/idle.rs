//! Idle aggregates: a passivated actor leaves its state warm in the
//! runtime (no actor), and the next command starts from it without reading
//! the store, with the same results as a live actor or a reload; the warm
//! states are a bounded cache (the longest idle dropped first, a dropped
//! one reloads); a warm state made stale by another writer is caught by
//! the append's expected version; a panicked actor leaves none. Then many
//! tasks hammering activation, passivation and commands at once, and a
//! property test against a plain model with another writer in the mix.
//!
//! `ANNALS_IDLE_CASES=N` runs N property cases (default 32, a few seconds).

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use annals::codec::decode_event;
use annals::{
    Aggregate, CommandContext, CommandError, EventStore, MemoryStore, Runtime, RuntimeConfig,
    StreamId, Version,
};
use common::{outside_append, whole_stream, Ledger, LedgerCommand as C, LedgerEvent, TestStore};
use proptest::prelude::*;

const IDLE: Duration = Duration::from_secs(10);

/// Lets the actors run what the clock made due.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// Time passes past the idle timeout (and the sweep after it).
async fn go_idle() {
    tokio::time::sleep(IDLE + IDLE / 2).await;
    settle().await;
}

fn config() -> annals::runtime::RuntimeConfigBuilder {
    RuntimeConfig::builder().idle_timeout(IDLE)
}

/// The state a full replay of the stored events gives.
async fn replayed(store: &dyn EventStore, id: &str) -> Ledger {
    let stream = StreamId::new(format!("ledger-{id}")).unwrap();
    let mut ledger = Ledger::default();
    for recorded in whole_stream(store, &stream).await {
        ledger.apply(&decode_event::<LedgerEvent>(&recorded).unwrap());
    }
    ledger
}

#[tokio::test(start_paused = true)]
async fn a_passivated_aggregate_comes_back_warm_without_reading_the_store() {
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(store.clone(), config().build().unwrap());
    let ledgers = runtime.aggregates::<Ledger>();
    ledgers.execute("w", C::Open).await.unwrap();
    ledgers.execute("w", C::Deposit(40)).await.unwrap();
    ledgers.execute("w", C::Note(7)).await.unwrap();
    assert!(ledgers.is_live("w") && !ledgers.is_idle("w"));

    go_idle().await;
    assert!(!ledgers.is_live("w"), "passivated after the idle timeout");
    assert!(ledgers.is_idle("w"), "its state stays warm");
    assert_eq!(
        (runtime.live_aggregates(), runtime.idle_aggregates()),
        (0, 1)
    );
    let (loads, read) = (store.loads_of("ledger-w"), events_read(&store));
    assert_eq!(loads, 1, "one recovery, when it first started");

    // The same answers as the live actor would give: a refusal with the
    // right figures, then events at the next versions.
    match ledgers.execute("w", C::Withdraw(41)).await {
        Err(CommandError::Domain(common::LedgerError::InsufficientFunds { balance, asked })) => {
            assert_eq!((balance, asked), (40, 41));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(ledgers.is_live("w") && !ledgers.is_idle("w"));
    go_idle().await;
    let done = ledgers
        .execute_with(
            "w",
            C::Withdraw(15),
            CommandContext::default().returning_state(),
        )
        .await
        .unwrap();
    assert_eq!(done.version, Version(4));
    assert_eq!(done.events, vec![LedgerEvent::Withdrawn { amount: 15 }]);
    let state = done.state.unwrap();
    assert_eq!(
        (state.balance, state.notes.clone(), state.events),
        (25, vec![7], 4)
    );
    assert_eq!(
        (store.loads_of("ledger-w"), events_read(&store)),
        (loads, read),
        "no recovery and no stream read: started from the warm state"
    );
    assert_eq!(state, replayed(&*store, "w").await);
    runtime.shutdown().await.unwrap();
    assert_eq!(
        runtime.idle_aggregates(),
        0,
        "shutdown drops the warm states"
    );
}

fn events_read(store: &TestStore) -> usize {
    store.events_read.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test(start_paused = true)]
async fn least_recently_used_eviction_keeps_the_state_warm_too() {
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(
        store.clone(),
        config().max_live_aggregates(2).build().unwrap(),
    );
    let ledgers = runtime.aggregates::<Ledger>();
    for id in ["a", "b", "c"] {
        ledgers.execute(id, C::Open).await.unwrap();
        ledgers.execute(id, C::Deposit(5)).await.unwrap();
    }
    settle().await;
    assert!(
        ledgers.is_idle("a"),
        "evicted as least recently used, kept warm"
    );
    let done = ledgers.execute("a", C::Deposit(1)).await.unwrap();
    assert_eq!(done.version, Version(3));
    assert_eq!(store.loads_of("ledger-a"), 1, "no reload");
    assert_eq!(ledgers.state("a").await.unwrap().balance, 6);
    runtime.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn without_a_cache_a_passivated_aggregate_reloads() {
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(
        store.clone(),
        config().max_idle_aggregates(0).build().unwrap(),
    );
    let ledgers = runtime.aggregates::<Ledger>();
    ledgers.execute("z", C::Open).await.unwrap();
    ledgers.execute("z", C::Deposit(3)).await.unwrap();
    go_idle().await;
    assert!(!ledgers.is_live("z") && !ledgers.is_idle("z"));
    assert_eq!(runtime.idle_aggregates(), 0);
    assert_eq!(
        ledgers.execute("z", C::Deposit(4)).await.unwrap().version,
        Version(3)
    );
    assert_eq!(store.loads_of("ledger-z"), 2, "reloaded from the store");
    assert_eq!(ledgers.state("z").await.unwrap().balance, 7);
    runtime.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_cache_is_bounded_and_drops_the_longest_idle_first() {
    const MAX: usize = 10;
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(
        store.clone(),
        config()
            .max_live_aggregates(1)
            .max_idle_aggregates(MAX)
            .build()
            .unwrap(),
    );
    let ledgers = runtime.aggregates::<Ledger>();
    // One live at a time: each new one evicts the previous into the cache.
    for n in 0..30u64 {
        let id = n.to_string();
        ledgers.execute(&id, C::Open).await.unwrap();
        ledgers.execute(&id, C::Deposit(n)).await.unwrap();
        settle().await;
        assert!(runtime.idle_aggregates() <= MAX, "bounded at every step");
    }
    go_idle().await;
    let idle: Vec<u64> = (0..30u64)
        .filter(|n| ledgers.is_idle(&n.to_string()))
        .collect();
    assert_eq!(idle.len(), runtime.idle_aggregates());
    assert!(!idle.is_empty() && idle.len() <= MAX, "{idle:?}");
    assert!(idle.contains(&29), "the most recent is kept: {idle:?}");
    assert!(!idle.contains(&0), "the longest idle went first: {idle:?}");
    // Those dropped reload from the store, with their state.
    for n in [0u64, 5, 29] {
        let id = n.to_string();
        let warm = ledgers.is_idle(&id);
        let loads = store.loads_of(&format!("ledger-{id}"));
        assert_eq!(ledgers.state(&id).await.unwrap().balance, n);
        let reloaded = store.loads_of(&format!("ledger-{id}")) - loads;
        assert_eq!(reloaded, usize::from(!warm), "ledger {n}: warm {warm}");
    }
    runtime.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_stale_warm_state_is_caught_by_the_expected_version() {
    // Two runtimes over one store: two processes sharing a database.
    let store = Arc::new(TestStore::new());
    let here = Runtime::new(store.clone(), config().build().unwrap());
    let there = Runtime::new(store.clone(), config().build().unwrap());
    let mine = here.aggregates::<Ledger>();
    let theirs = there.aggregates::<Ledger>();
    mine.execute("s", C::Open).await.unwrap();
    mine.execute("s", C::Deposit(10)).await.unwrap();
    go_idle().await;
    assert!(mine.is_idle("s"));
    // Meanwhile the other process moves the stream on.
    theirs.execute("s", C::Withdraw(4)).await.unwrap();
    outside_append(&*store, "ledger-s", LedgerEvent::Noted { seq: 1 }).await;
    assert!(
        mine.is_idle("s"),
        "the warm state is now stale (version 2 of 4)"
    );

    // A command decided on the stale state conflicts on append, catches
    // up and is decided again: the right version, the right balance.
    let done = mine
        .execute_returning_state("s", C::Withdraw(5))
        .await
        .unwrap();
    assert_eq!(done.version, Version(5));
    assert_eq!(done.state.as_ref().unwrap().balance, 1);
    assert_eq!(done.state.unwrap(), replayed(&*store, "s").await);

    // A refusal decided on a stale state is checked against the stream.
    go_idle().await;
    theirs.execute("s", C::Deposit(100)).await.unwrap();
    assert!(mine.is_idle("s"));
    let done = mine.execute("s", C::Withdraw(50)).await.unwrap();
    assert_eq!(done.version, Version(7), "decided on the caught-up state");

    // A caller's expected version is checked against the stream, not the
    // stale state.
    go_idle().await;
    theirs.execute("s", C::Note(2)).await.unwrap();
    assert!(mine.is_idle("s"));
    match mine
        .execute_with(
            "s",
            C::Note(3),
            CommandContext::default().expecting(Version(7)),
        )
        .await
    {
        Err(CommandError::WrongExpectedVersion { actual, .. }) => assert_eq!(actual, Version(8)),
        other => panic!("expected a wrong expected version, got {other:?}"),
    }
    // And a state query catches up before answering.
    go_idle().await;
    theirs.execute("s", C::Note(4)).await.unwrap();
    assert!(mine.is_idle("s"));
    let state = mine.state("s").await.unwrap();
    assert_eq!(state, replayed(&*store, "s").await);
    assert_eq!(state.notes, vec![1, 2, 4]);
    here.shutdown().await.unwrap();
    there.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_panicked_actor_leaves_no_warm_state() {
    let store = Arc::new(TestStore::new());
    let runtime = Runtime::new(store.clone(), config().build().unwrap());
    let ledgers = runtime.aggregates::<Ledger>();
    ledgers.execute("p", C::Open).await.unwrap();
    ledgers.execute("p", C::Deposit(2)).await.unwrap();
    let error = ledgers.execute("p", C::PanicInHandle).await.unwrap_err();
    assert!(
        matches!(error, CommandError::AggregatePanicked { .. }),
        "{error}"
    );
    go_idle().await;
    assert!(!ledgers.is_idle("p") && !ledgers.is_live("p"));
    let loads = store.loads_of("ledger-p");
    assert_eq!(ledgers.state("p").await.unwrap().balance, 2);
    assert_eq!(store.loads_of("ledger-p"), loads + 1, "reloaded, not warm");
    runtime.shutdown().await.unwrap();
}

/// Many tasks at once on a few aggregates, with actors passivated all the
/// time (a 1 ms idle timeout, two live at most, a cache smaller than the
/// aggregates): no command is lost or applied twice, and every state equals
/// its stream's replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_hammering_activation_passivation_and_commands() {
    const IDS: usize = 12;
    const TASKS: usize = 32;
    const COMMANDS: usize = 150;
    let store = Arc::new(MemoryStore::new());
    let runtime = Runtime::new(
        store.clone(),
        RuntimeConfig::builder()
            .idle_timeout(Duration::from_millis(1))
            .max_live_aggregates(2)
            .max_idle_aggregates(5)
            .build()
            .unwrap(),
    );
    let ledgers = runtime.aggregates::<Ledger>();
    for id in 0..IDS {
        ledgers.execute(&id.to_string(), C::Open).await.unwrap();
    }
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let ledgers = ledgers.clone();
            tokio::spawn(async move {
                let mut deposited = vec![0u64; IDS];
                let mut stored = 0u64;
                for n in 0..COMMANDS {
                    let id = (task * 7 + n * 5) % IDS;
                    if n % 10 == 3 {
                        // Queries race passivation too.
                        ledgers.state(&id.to_string()).await.unwrap();
                        continue;
                    }
                    let amount = (task * COMMANDS + n) as u64 % 3 + 1;
                    ledgers
                        .execute(&id.to_string(), C::Deposit(amount))
                        .await
                        .unwrap();
                    deposited[id] += amount;
                    stored += 1;
                    if n % 16 == 0 {
                        // Gaps long enough for the sweep to passivate.
                        tokio::time::sleep(Duration::from_millis(3)).await;
                    }
                }
                (deposited, stored)
            })
        })
        .collect();
    let mut expected = [0u64; IDS];
    let mut stored = IDS as u64;
    for task in tasks {
        let (deposited, commands) = task.await.unwrap();
        stored += commands;
        for (id, amount) in deposited.into_iter().enumerate() {
            expected[id] += amount;
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        runtime.idle_aggregates() <= 5,
        "{} idle, maximum 5",
        runtime.idle_aggregates()
    );
    let mut events = 0;
    for (id, amount) in expected.iter().enumerate() {
        let id = id.to_string();
        let state = ledgers.state(&id).await.unwrap();
        assert_eq!(state.balance, *amount, "ledger {id}");
        assert_eq!(state, replayed(&*store, &id).await, "ledger {id}");
        events += state.events;
    }
    assert_eq!(events, stored, "every command stored once");
    runtime.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------
// Against a model.

const LEDGERS: usize = 3;

#[derive(Debug, Clone)]
enum Step {
    Execute(usize, C),
    /// Another writer appends a note to the stream.
    Foreign(usize, u64),
    /// Time passes past the idle timeout: every actor passivates.
    Idle,
    /// The state equals the model's.
    Check(usize),
}

fn command() -> impl Strategy<Value = C> {
    prop_oneof![
        2 => Just(C::Open),
        5 => (0u64..50).prop_map(C::Deposit),
        4 => (0u64..80).prop_map(C::Withdraw),
        2 => (0u64..100).prop_map(C::Note),
        1 => (0u64..20).prop_map(C::DepositTwice),
        1 => Just(C::Nothing),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        20 => (0..LEDGERS, command()).prop_map(|(ledger, c)| Step::Execute(ledger, c)),
        3 => (0..LEDGERS, 0u64..100).prop_map(|(ledger, seq)| Step::Foreign(ledger, seq)),
        4 => Just(Step::Idle),
        2 => (0..LEDGERS).prop_map(Step::Check),
    ]
}

fn cases() -> u32 {
    crate::common::setting("ANNALS_IDLE_CASES", 32)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn warm_states_match_a_plain_model(
        max_live in prop_oneof![Just(1usize), Just(2), Just(100)],
        max_idle in prop_oneof![Just(0usize), Just(1), Just(2), Just(100)],
        snapshot_every in prop_oneof![Just(0u64), Just(2), Just(100)],
        steps in prop::collection::vec(step(), 1..60),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(run_model(max_live, max_idle, snapshot_every, steps))?;
    }
}

async fn run_model(
    max_live: usize,
    max_idle: usize,
    snapshot_every: u64,
    steps: Vec<Step>,
) -> Result<(), TestCaseError> {
    let store = Arc::new(MemoryStore::new());
    let runtime = Runtime::new(
        store.clone(),
        config()
            .max_live_aggregates(max_live)
            .max_idle_aggregates(max_idle)
            .snapshot_every(snapshot_every)
            .build()
            .unwrap(),
    );
    let ledgers = runtime.aggregates::<Ledger>();
    let mut model = vec![(Ledger::default(), 0u64); LEDGERS];
    for step in steps {
        match step {
            Step::Execute(ledger, command) => {
                let id = ledger.to_string();
                let (state, version) = &mut model[ledger];
                let answer = ledgers.execute(&id, command.clone()).await;
                match state.handle(&command) {
                    Ok(events) => {
                        let done = answer.map_err(|e| TestCaseError::fail(e.to_string()))?;
                        prop_assert_eq!(&done.events, &events, "{:?}", command);
                        for event in &events {
                            state.apply(event);
                        }
                        *version += events.len() as u64;
                        prop_assert_eq!(done.version, Version(*version));
                    }
                    Err(refusal) => match answer {
                        Err(CommandError::Domain(error)) => prop_assert_eq!(error, refusal),
                        other => prop_assert!(false, "expected {refusal}, got {other:?}"),
                    },
                }
            }
            Step::Foreign(ledger, seq) => {
                let event = LedgerEvent::Noted { seq };
                outside_append(&*store, &format!("ledger-{ledger}"), event.clone()).await;
                model[ledger].0.apply(&event);
                model[ledger].1 += 1;
            }
            Step::Idle => go_idle().await,
            Step::Check(ledger) => {
                let state = ledgers.state(&ledger.to_string()).await.unwrap();
                prop_assert_eq!(&state, &model[ledger].0);
            }
        }
        settle().await;
        prop_assert!(runtime.idle_aggregates() <= max_idle);
    }
    for (ledger, (state, _)) in model.iter().enumerate() {
        let id = ledger.to_string();
        prop_assert_eq!(&ledgers.state(&id).await.unwrap(), state);
        prop_assert_eq!(&replayed(&*store, &id).await, state);
    }
    runtime.shutdown().await.unwrap();
    Ok(())
}
