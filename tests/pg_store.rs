//! The PostgreSQL store under the conditions of several processes sharing
//! one schema: concurrent appends from several stores with subscribers on
//! each, late commits and failures at commit, connections killed
//! mid-batch, reopening, and bad input. Each test uses its own schema; a
//! missing server fails the test with how to start it (`ANNALS_PG=off`
//! skips them). The same rules as every backend are in
//! `store_conformance.rs`.

mod pg_support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use annals::projection::{subscribe, Subscription};
use annals::store::{
    AppendError, EventFilter, PostgresConfig, PostgresStore, ReadDirection, POSTGRES_FORMAT_VERSION,
};
use annals::{
    EventStore, ExpectedVersion, InvalidInput, NewEvent, Position, RecordedEvent, StoreError,
    StreamId, Version,
};
use uuid::Uuid;

/// Stores that play separate processes: each has its own pool, writer and
/// LISTEN connection, and they share nothing but the schema.
fn processes(config: &PostgresConfig, count: usize) -> Vec<Arc<PostgresStore>> {
    (0..count)
        .map(|_| Arc::new(pg_support::open(config.clone())))
        .collect()
}

fn stream(id: &str) -> StreamId {
    StreamId::new(id).expect("valid stream id")
}

/// Every event of the log, read in pages.
async fn whole_log(store: &dyn EventStore) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    loop {
        let from = Position(events.len() as u64 + 1);
        let page = store
            .read_all(from, ReadDirection::Forward, 1000, &EventFilter::All)
            .await
            .expect("read_all");
        if page.is_empty() {
            return events;
        }
        events.extend(page);
    }
}

/// Positions 1..n, and per stream versions 1..n.
fn assert_dense(log: &[RecordedEvent]) {
    for (index, event) in log.iter().enumerate() {
        assert_eq!(event.position, Position(index as u64 + 1), "gap or reorder");
    }
    let mut versions: HashMap<&str, u64> = HashMap::new();
    for event in log {
        let version = versions.entry(event.stream_id.as_str()).or_default();
        *version += 1;
        assert_eq!(event.version, Version(*version), "{}", event.stream_id);
    }
}

/// Collects what a subscriber delivers until it has `count` events, and
/// checks that it is 1..count in order.
async fn subscriber_sees(store: Arc<PostgresStore>, count: usize) -> Vec<RecordedEvent> {
    delivered_in_order(subscribe(store, Position::START, EventFilter::All), count).await
}

/// Takes `count` events from `subscription`, checking that they are
/// 1..count in order.
async fn delivered_in_order(mut subscription: Subscription, count: usize) -> Vec<RecordedEvent> {
    let mut seen = Vec::with_capacity(count);
    while seen.len() < count {
        let next = tokio::time::timeout(Duration::from_secs(30), subscription.next())
            .await
            .expect("the subscriber stalled")
            .expect("the subscription ended")
            .expect("subscription error");
        assert_eq!(
            next.position,
            Position(seen.len() as u64 + 1),
            "the subscriber skipped or reordered"
        );
        seen.push(next);
    }
    seen
}

/// Collects a raw live feed (no catch-up reads) until `count` events: each
/// store must publish every process's commits itself, in position order.
async fn live_feed_sees(store: &PostgresStore, count: usize) -> tokio::task::JoinHandle<Vec<u64>> {
    let mut feed = store.subscribe_live();
    tokio::spawn(async move {
        let mut positions = Vec::with_capacity(count);
        while positions.len() < count {
            let commit = tokio::time::timeout(Duration::from_secs(30), feed.recv())
                .await
                .expect("the live feed stalled")
                .expect("live feed error");
            positions.extend(commit.iter().map(|e| e.position.0));
        }
        positions
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_stores_on_one_schema_give_every_subscriber_one_gapless_order() {
    if pg_support::disabled() {
        return;
    }
    const STORES: usize = 3;
    const TASKS_PER_STORE: usize = 16;
    const APPENDS_PER_TASK: usize = 40;
    let config = pg_support::config();
    let stores = processes(&config, STORES);

    // Every append carries 1 or 2 events: the total is known in advance.
    let events_of = |task: usize, round: usize| 1 + (task + round) % 2;
    let total: usize = (0..STORES * TASKS_PER_STORE)
        .map(|task| {
            (0..APPENDS_PER_TASK)
                .map(|round| events_of(task, round))
                .sum::<usize>()
        })
        .sum();

    let mut feeds = Vec::new();
    for store in &stores {
        feeds.push(live_feed_sees(store, total).await);
    }
    let subscribers: Vec<_> = stores
        .iter()
        .map(|store| tokio::spawn(subscriber_sees(Arc::clone(store), total)))
        .collect();

    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let mut appenders = Vec::new();
    for task in 0..STORES * TASKS_PER_STORE {
        let store = Arc::clone(&stores[task % STORES]);
        let acknowledged = Arc::clone(&acknowledged);
        appenders.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for round in 0..APPENDS_PER_TASK {
                // Hot streams shared by every store, and a cold one per task.
                let id = if round % 3 == 0 {
                    format!("cold-{task}")
                } else {
                    format!("hot-{}", round % 4)
                };
                let events: Vec<NewEvent> = (0..events_of(task, round))
                    .map(|i| NewEvent::new("Noted", format!("{task}/{round}/{i}").into_bytes()))
                    .collect();
                let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
                // A stale expected version first, on hot streams: refused,
                // writes nothing, and does not fail the rest of its group.
                if round % 3 == 1 {
                    let stale = store
                        .append(
                            &stream(&id),
                            ExpectedVersion::Exact(Version(0)),
                            events.clone(),
                        )
                        .await;
                    match stale {
                        Err(AppendError::WrongExpectedVersion { .. }) => conflicts += 1,
                        Ok(_) => {
                            // The stream was empty: the append went in.
                            acknowledged.lock().unwrap().extend(ids);
                            continue;
                        }
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                }
                store
                    .append(&stream(&id), ExpectedVersion::Any, events)
                    .await
                    .expect("append");
                acknowledged.lock().unwrap().extend(ids);
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for appender in appenders {
        conflicts += appender.await.expect("appender");
    }
    assert!(conflicts > 0, "the stale appends should have conflicted");

    let acknowledged = acknowledged.lock().unwrap().clone();
    assert_eq!(acknowledged.len(), total);
    for subscriber in subscribers {
        let seen = subscriber.await.expect("subscriber");
        let ids: HashSet<Uuid> = seen.iter().map(|e| e.event_id).collect();
        assert_eq!(ids, acknowledged, "a subscriber saw other events");
    }
    for feed in feeds {
        let positions = feed.await.expect("live feed");
        let expected: Vec<u64> = (1..=total as u64).collect();
        assert_eq!(positions, expected, "a live feed skipped or reordered");
    }
    for store in &stores {
        assert_eq!(store.head_position(), Position(total as u64));
    }
    let log = whole_log(&*stores[0]).await;
    assert_eq!(log.len(), total);
    assert_dense(&log);
    let batched: u64 = stores.iter().map(|s| s.stats().transactions).sum();
    let appends: u64 = stores.iter().map(|s| s.stats().appends).sum();
    assert!(
        batched <= appends,
        "{batched} transactions for {appends} appends"
    );
    for store in &stores {
        store.shutdown().await.expect("shutdown");
    }
}

/// Installs, in the test's schema only, a deferred constraint trigger that
/// makes `Slow` events commit late (the transaction holds its locks while
/// it sleeps at COMMIT) and `FailAtCommit` events fail at COMMIT.
fn install_late_commit_trigger(schema: &str) {
    pg_support::execute(&format!(
        "CREATE FUNCTION {schema}.at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.event_type = 'Slow' THEN PERFORM pg_sleep(0.02); END IF;
           IF NEW.event_type = 'FailAtCommit' THEN
             RAISE EXCEPTION 'refused at commit';
           END IF;
           RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON {schema}.events
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {schema}.at_commit();"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_commits_and_failures_at_commit_neither_skip_nor_leave_gaps() {
    if pg_support::disabled() {
        return;
    }
    const TASKS: usize = 12;
    const APPENDS_PER_TASK: usize = 25;
    let config = pg_support::config();
    let stores = processes(&config, 2);
    install_late_commit_trigger(&config.schema);

    // A raw reader that follows the log with read_all only: every page must
    // continue exactly where the previous one ended.
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let store = Arc::clone(&stores[1]);
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut last = 0u64;
            let mut pages = 0;
            loop {
                let finished = done.load(Ordering::Acquire);
                let page = store
                    .read_all(
                        Position(last + 1),
                        ReadDirection::Forward,
                        100,
                        &EventFilter::All,
                    )
                    .await
                    .expect("read_all");
                for event in &page {
                    assert_eq!(event.position.0, last + 1, "a reader saw p+1 before p");
                    last = event.position.0;
                }
                pages += 1;
                if finished && page.is_empty() {
                    return (last, pages);
                }
            }
        })
    };

    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let refused = Arc::new(Mutex::new(HashSet::new()));
    let mut appenders = Vec::new();
    for task in 0..TASKS {
        let store = Arc::clone(&stores[task % 2]);
        let (acknowledged, refused) = (Arc::clone(&acknowledged), Arc::clone(&refused));
        appenders.push(tokio::spawn(async move {
            for round in 0..APPENDS_PER_TASK {
                let kind = match (task + round) % 5 {
                    0 => "Slow",
                    3 => "FailAtCommit",
                    _ => "Noted",
                };
                let event = NewEvent::new(kind, vec![round as u8]);
                let id = event.event_id;
                let result = store
                    .append(
                        &stream(&format!("late-{}", round % 3)),
                        ExpectedVersion::Any,
                        vec![event],
                    )
                    .await;
                match (kind, result) {
                    ("FailAtCommit", Err(AppendError::Store(StoreError::Backend(_)))) => {
                        refused.lock().unwrap().insert(id);
                    }
                    ("FailAtCommit", other) => panic!("a failing commit answered {other:?}"),
                    (_, Ok(_)) => {
                        acknowledged.lock().unwrap().insert(id);
                    }
                    (_, Err(error)) => panic!("an innocent append failed: {error}"),
                }
            }
        }));
    }
    for appender in appenders {
        appender.await.expect("appender");
    }
    done.store(true, Ordering::Release);
    let acknowledged = acknowledged.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    assert!(!refused.is_empty());

    let (last, _) = reader.await.expect("reader");
    assert_eq!(last, acknowledged.len() as u64);
    let log = whole_log(&*stores[0]).await;
    assert_dense(&log);
    let stored: HashSet<Uuid> = log.iter().map(|e| e.event_id).collect();
    assert_eq!(
        stored, acknowledged,
        "rolled-back events stored or acknowledged ones lost"
    );
    assert!(stored.is_disjoint(&refused));
    for store in &stores {
        let seen = subscriber_sees(Arc::clone(store), acknowledged.len()).await;
        assert_eq!(seen, log);
    }
}

/// Kills every connection of `application_name` but the caller's.
fn terminate_connections(application_name: &str) -> u64 {
    let name = application_name.to_owned();
    pg_support::with_client(move |client, runtime| {
        runtime
            .block_on(client.query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = $1 AND pid <> pg_backend_pid()",
                &[&name],
            ))
            .map(|rows| rows.len() as u64)
            .unwrap_or(0)
    })
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_connections_lose_nothing_acknowledged_and_the_store_recovers() {
    if pg_support::disabled() {
        return;
    }
    const TASKS: usize = 16;
    const APPENDS_PER_TASK: usize = 20;
    let schema = pg_support::fresh_schema();
    let application_name = format!("annals_kill_{schema}");
    let config = PostgresConfig::new(pg_support::url_with_application_name(&application_name))
        .schema(schema)
        .pool_size(4)
        .poll_interval(Duration::from_millis(50));
    let store = Arc::new(pg_support::open(config.clone()));
    // Slow commits make the kills land inside transactions and at COMMIT.
    install_late_commit_trigger(&config.schema);

    let stop = Arc::new(AtomicBool::new(false));
    // Stops the killer even when the test fails before the end: the test's
    // runtime waits for its blocking tasks when it drops.
    let _stop_on_panic = StopOnDrop(Arc::clone(&stop));
    let killer = {
        let stop = Arc::clone(&stop);
        let name = application_name.clone();
        tokio::task::spawn_blocking(move || {
            // Kills for a bounded time; the appends finish after it.
            let until = std::time::Instant::now() + Duration::from_secs(3);
            let mut killed = 0;
            while !stop.load(Ordering::Acquire) && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(60));
                killed += terminate_connections(&name);
            }
            killed
        })
    };

    let mut appenders = Vec::new();
    for task in 0..TASKS {
        let store = Arc::clone(&store);
        appenders.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut unknown = 0;
            for round in 0..APPENDS_PER_TASK {
                let kind = if round % 4 == 0 { "Slow" } else { "Noted" };
                let events = vec![
                    NewEvent::new(kind, vec![1]),
                    NewEvent::new("Noted", vec![2]),
                ];
                let target = stream(&format!("kill-{}", (task + round) % 5));
                // Retried with the same ids until acknowledged: a retry of an
                // append that did commit must not write it twice.
                let result = loop {
                    match store
                        .append(&target, ExpectedVersion::Any, events.clone())
                        .await
                    {
                        Ok(result) => break result,
                        Err(AppendError::Store(StoreError::OutcomeUnknown(_))) => unknown += 1,
                        Err(AppendError::Store(StoreError::Backend(_))) => {}
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                assert_eq!(result.last_version.0, result.first_version.0 + 1);
                acknowledged.extend(events.iter().map(|e| (e.event_id, result)));
            }
            (acknowledged, unknown)
        }));
    }
    let mut acknowledged = BTreeMap::new();
    let mut unknown = 0;
    for appender in appenders {
        let (events, outcomes_unknown) = appender.await.expect("appender");
        acknowledged.extend(events);
        unknown += outcomes_unknown;
    }
    stop.store(true, Ordering::Release);
    let killed = killer.await.expect("killer");
    assert!(
        killed > 0,
        "no connection was terminated: the test tested nothing"
    );
    eprintln!(
        "terminated {killed} connections; writer retries {}; outcomes unknown {unknown}",
        store.stats().retries
    );

    // Recovered by itself: a new append and reads work on the same store.
    let after = store
        .append(
            &stream("kill-after"),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Noted", vec![])],
        )
        .await
        .expect("the store did not recover");
    let log = whole_log(&*store).await;
    assert_dense(&log);
    assert_eq!(log.len(), acknowledged.len() + 1);
    assert_eq!(after.last_position, Position(log.len() as u64));
    for event in &log[..log.len() - 1] {
        let result = acknowledged
            .get(&event.event_id)
            .unwrap_or_else(|| panic!("{} was stored but never acknowledged", event.event_id));
        assert!(event.position >= result.first_position && event.position <= result.last_position);
    }
    let seen = subscriber_sees(Arc::clone(&store), log.len()).await;
    assert_eq!(seen, log);
    assert_eq!(store.head_position(), Position(log.len() as u64));
}

/// A catch-up with pages large enough to be read ahead: the next page is
/// read on a blocking thread that drives the PostgreSQL client there, while
/// appends go on. Every event arrives once, in order, across the switch to
/// live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_read_ahead_on_postgresql_delivers_every_event_in_order() {
    use annals::projection::READ_AHEAD_MIN_PAGE;
    if pg_support::disabled() {
        return;
    }
    let store = Arc::new(pg_support::open(pg_support::config()));
    let append = |store: Arc<PostgresStore>, streams: std::ops::Range<usize>| async move {
        for n in streams {
            let events = (0..100)
                .map(|_| NewEvent::new("Happened", vec![1]))
                .collect();
            store
                .append(
                    &stream(&format!("order-{n}")),
                    ExpectedVersion::NoStream,
                    events,
                )
                .await
                .expect("append");
        }
    };
    // Two and a half pages before the subscription, more while it catches up.
    let before = READ_AHEAD_MIN_PAGE * 5 / 200;
    append(Arc::clone(&store), 0..before).await;
    let subscription = subscribe(
        Arc::clone(&store) as Arc<dyn EventStore>,
        Position::START,
        EventFilter::All,
    )
    .with_page_size(READ_AHEAD_MIN_PAGE);
    let during = tokio::spawn(append(Arc::clone(&store), before..before + 20));
    delivered_in_order(subscription, (before + 20) * 100).await;
    during.await.unwrap();
    store.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn reopening_continues_at_the_head_with_every_field_intact() {
    if pg_support::disabled() {
        return;
    }
    let config = pg_support::config();
    let first = pg_support::open(config.clone());
    let mut event = NewEvent::new("OrderPlaced", vec![0, 1, 2, 255]).with_schema_version(3);
    event.metadata.correlation_id = Some(Uuid::now_v7());
    event.metadata.causation_id = Some(Uuid::now_v7());
    event.metadata.extra.insert("tenant".into(), "acme".into());
    first
        .append(
            &stream("order-1"),
            ExpectedVersion::NoStream,
            vec![event.clone()],
        )
        .await
        .expect("append");
    let written = whole_log(&first).await;
    first.shutdown().await.expect("shutdown");
    drop(first);

    let second = pg_support::open(config);
    assert_eq!(second.head_position(), Position(1));
    let read = whole_log(&second).await;
    assert_eq!(read, written);
    let stored = &read[0];
    assert_eq!(stored.event_id, event.event_id);
    assert_eq!(stored.schema_version, 3);
    assert_eq!(stored.metadata, event.metadata);
    assert_eq!(stored.payload, event.payload);
    let next = second
        .append(
            &stream("order-1"),
            ExpectedVersion::Exact(Version(1)),
            vec![NewEvent::new("OrderShipped", vec![])],
        )
        .await
        .expect("append after reopening");
    assert_eq!(
        (next.last_version, next.last_position),
        (Version(2), Position(2))
    );
}

#[tokio::test]
async fn another_format_or_foreign_tables_are_typed_errors() {
    if pg_support::disabled() {
        return;
    }
    let config = pg_support::config();
    drop(pg_support::open(config.clone()));
    pg_support::execute(&format!("UPDATE {}.format SET version = 99", config.schema));
    match PostgresStore::open(config) {
        Err(StoreError::FormatMismatch { found, expected }) => {
            assert_eq!((found, expected), (99, POSTGRES_FORMAT_VERSION));
        }
        other => panic!("expected a format mismatch, got {other:?}"),
    }

    let foreign = pg_support::config();
    pg_support::execute(&format!(
        "CREATE SCHEMA {0}; CREATE TABLE {0}.customers (id int)",
        foreign.schema
    ));
    assert!(matches!(
        PostgresStore::open(foreign),
        Err(StoreError::NotAStore(_))
    ));
}

#[tokio::test]
async fn bad_settings_and_unreachable_servers_are_typed_errors() {
    let bad_schema = PostgresConfig::new(pg_support::url()).schema("Robert'); DROP TABLE x;--");
    assert!(matches!(
        PostgresStore::open(bad_schema),
        Err(StoreError::InvalidInput(
            InvalidInput::InvalidCharacter { .. }
        ))
    ));
    let no_pool = PostgresConfig::new(pg_support::url()).pool_size(0);
    assert!(matches!(
        PostgresStore::open(no_pool),
        Err(StoreError::InvalidInput(InvalidInput::TooSmall {
            what: "pool_size",
            ..
        }))
    ));
    // Nothing listens on port 1: a typed error, quickly, and no panic.
    let nowhere = PostgresConfig::new("postgresql://postgres@127.0.0.1:1/test")
        .connect_timeout(Duration::from_secs(2));
    assert!(matches!(
        PostgresStore::open(nowhere),
        Err(StoreError::Backend(_))
    ));
}

#[tokio::test]
async fn bad_input_writes_nothing() {
    if pg_support::disabled() {
        return;
    }
    let store = pg_support::open(pg_support::config().max_event_size(64));
    let order = stream("order-9");
    let too_large = NewEvent::new("Big", vec![0; 65]);
    assert!(matches!(
        store
            .append(&order, ExpectedVersion::Any, vec![too_large])
            .await,
        Err(AppendError::InvalidInput(
            InvalidInput::EventTooLarge { .. }
        ))
    ));
    let twice = NewEvent::new("Twice", vec![]);
    assert!(matches!(
        store
            .append(&order, ExpectedVersion::Any, vec![twice.clone(), twice])
            .await,
        Err(AppendError::InvalidInput(
            InvalidInput::DuplicateEventIdInAppend(_)
        ))
    ));
    assert!(matches!(
        store
            .append(
                &order,
                ExpectedVersion::StreamExists,
                vec![NewEvent::new("X", vec![])]
            )
            .await,
        Err(AppendError::WrongExpectedVersion { .. })
    ));
    assert!(whole_log(&store).await.is_empty());
    assert_eq!(store.head_position(), Position::START);
}
