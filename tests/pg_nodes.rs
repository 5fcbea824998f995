//! PostgreSQL shared by several processes, beyond the log itself: read
//! models kept in PostgreSQL tables exactly once (the handler writes in the
//! transaction that moves the checkpoint, fenced), one runner per
//! projection name across processes (the checkpoint lease, and the fence
//! that stops a runner that lost it), a `kill -9` of a child process in the
//! middle of a read-model batch, and a hung session holding the head row.
//! Each test uses its own schema; a missing server fails the test with how
//! to start it (`ANNALS_PG=off` skips them).

mod pg_support;

use pg_support::models::{
    client, create_tables, rebuilt, stored_model, Add, Tally, TallyEvent, Totals,
};

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use annals::projection::{FailurePolicy, ProjectionControlError, ProjectionState};
use annals::store::{
    AppendError, EventFilter, PostgresConfig, PostgresStore, ReadDirection, ReadModelStore,
};
use annals::{
    EventStore, ExpectedVersion, InvalidInput, NewEvent, Position, ProjectionConfig,
    ProjectionHandle, RecordedEvent, StoreError, StreamId,
};
use tokio::sync::Semaphore;
use uuid::Uuid;

const NAME: &str = "totals";
const CHILD_ENV: &str = "ANNALS_PG_NODES_CHILD_SCHEMA";

/// Starts the read model on `store` once no other process holds its lease.
async fn spawn_when_free(store: &Arc<PostgresStore>, schema: &str) -> ProjectionHandle {
    loop {
        match ProjectionHandle::spawn_read_model(
            Arc::clone(store),
            projection_config(50),
            Totals::new(schema),
        )
        .await
        {
            Ok(handle) => return handle,
            Err(ProjectionControlError::AlreadyRunning { .. }) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("{other}"),
        }
    }
}

fn config(schema: &str) -> PostgresConfig {
    PostgresConfig::new(pg_support::url())
        .schema(schema)
        .pool_size(4)
        .poll_interval(Duration::from_millis(50))
}

fn projection_config(batch: usize) -> ProjectionConfig {
    ProjectionConfig::builder(NAME)
        .batch_size(batch)
        .failure_policy(FailurePolicy::Retry {
            max_attempts: 1,
            backoff: Duration::from_millis(10),
        })
        .build()
        .unwrap()
}

/// Appends `count` events over `streams` streams, ten per append, from 8
/// tasks.
async fn fill(store: &Arc<PostgresStore>, count: usize, streams: usize) -> Position {
    let mut last = Position::START;
    let mut tasks = tokio::task::JoinSet::new();
    let per_task = count / 8;
    for task in 0..8 {
        let store = Arc::clone(store);
        tasks.spawn(async move {
            let mut last = Position::START;
            for n in (0..per_task).step_by(10) {
                let stream =
                    StreamId::new(format!("s-{}", (task * per_task + n) % streams)).unwrap();
                let events = (0..10).map(|i| NewEvent::new("Noted", vec![i])).collect();
                let result = store
                    .append(&stream, ExpectedVersion::Any, events)
                    .await
                    .unwrap();
                last = last.max(result.last_position);
            }
            last
        });
    }
    while let Some(done) = tasks.join_next().await {
        last = last.max(done.unwrap());
    }
    last
}

/// Every event of the log.
async fn whole_log(store: &dyn EventStore) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    loop {
        let page = store
            .read_all(
                Position(events.len() as u64 + 1),
                ReadDirection::Forward,
                1000,
                &EventFilter::All,
            )
            .await
            .unwrap();
        if page.is_empty() {
            return events;
        }
        events.extend(page);
    }
}

/// Checks that the stored read model is exactly the log up to the stored
/// checkpoint, and returns that checkpoint.
async fn assert_model_matches_checkpoint(store: &PostgresStore, schema: &str) -> Position {
    let checkpoint = store
        .load_checkpoint(NAME)
        .await
        .unwrap()
        .unwrap_or(Position::START);
    let log = whole_log(store).await;
    let (totals, applied) = stored_model(schema).await;
    let (expected_totals, expected_applied) = rebuilt(&log, checkpoint);
    assert_eq!(
        applied.len(),
        expected_applied.len(),
        "applied rows against the checkpoint {checkpoint}"
    );
    assert_eq!(applied, expected_applied, "an event applied twice or lost");
    assert_eq!(totals, expected_totals, "totals differ from a rebuild");
    checkpoint
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_commit_is_fenced_and_all_or_nothing() {
    if pg_support::disabled() {
        return;
    }
    let config = pg_support::config();
    let schema = config.schema.clone();
    let store = Arc::new(pg_support::open(config));
    create_tables(&schema);
    let insert = format!("INSERT INTO {schema}.applied VALUES ($1, 'x')");

    // The store's own tables are refused.
    assert!(matches!(
        store.begin("fenced", &[format!("{schema}.events")]).await,
        Err(StoreError::InvalidInput(InvalidInput::ReservedName { .. }))
    ));

    // Dropped without a commit: nothing written.
    let transaction = store.begin("fenced", &[]).await.unwrap();
    transaction.execute(&insert, &[&100i64]).await.unwrap();
    drop(transaction);

    // Two runners start from "no checkpoint": the first commit wins, the
    // second writes nothing.
    let first = store.begin("fenced", &[]).await.unwrap();
    let second = store.begin("fenced", &[]).await.unwrap();
    first.execute(&insert, &[&1i64]).await.unwrap();
    second.execute(&insert, &[&2i64]).await.unwrap();
    store
        .commit(first, "fenced", None, Position(5))
        .await
        .unwrap();
    match store.commit(second, "fenced", None, Position(5)).await {
        Err(StoreError::CheckpointMoved {
            expected: None,
            found: Some(Position(5)),
            ..
        }) => {}
        other => panic!("expected CheckpointMoved, got {other:?}"),
    }

    // A stale `from` is fenced off too; the right one moves it.
    let stale = store.begin("fenced", &[]).await.unwrap();
    stale.execute(&insert, &[&3i64]).await.unwrap();
    assert!(matches!(
        store
            .commit(stale, "fenced", Some(Position(4)), Position(9))
            .await,
        Err(StoreError::CheckpointMoved {
            found: Some(Position(5)),
            ..
        })
    ));
    let mut good = store.begin("fenced", &[]).await.unwrap();
    good.execute(&insert, &[&4i64]).await.unwrap();
    // A failed statement is rolled back to the savepoint, the rest kept.
    store.savepoint(&mut good).await.unwrap();
    assert!(good
        .execute(&format!("INSERT INTO {schema}.nowhere VALUES (1)"), &[])
        .await
        .is_err());
    store.rollback_to_savepoint(&mut good).await.unwrap();
    store
        .commit(good, "fenced", Some(Position(5)), Position(9))
        .await
        .unwrap();

    let (_, applied) = stored_model(&schema).await;
    assert_eq!(applied, vec![1, 4], "only the winning commits' writes");
    assert_eq!(
        store.load_checkpoint("fenced").await.unwrap(),
        Some(Position(9))
    );
    store.shutdown().await.unwrap();
    pg_support::execute(&format!("DROP SCHEMA {schema} CASCADE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_runner_per_name_across_processes_and_a_takeover_applies_each_event_once() {
    if pg_support::disabled() {
        return;
    }
    let schema = pg_support::fresh_schema();
    // Two stores on one schema play two processes.
    let first = Arc::new(pg_support::open(config(&schema)));
    let second = Arc::new(pg_support::open(config(&schema)));
    create_tables(&schema);
    let head = fill(&first, 1200, 30).await;

    let running = ProjectionHandle::spawn_read_model(
        Arc::clone(&first),
        projection_config(50),
        Totals::new(&schema),
    )
    .await
    .unwrap();
    // The other process cannot start a runner of that name.
    match ProjectionHandle::spawn_read_model(
        Arc::clone(&second),
        projection_config(50),
        Totals::new(&schema),
    )
    .await
    {
        Err(ProjectionControlError::AlreadyRunning { .. }) => {}
        other => panic!("expected AlreadyRunning, got {other:?}"),
    }
    let reached = running
        .wait_for(Position(head.0 / 2), Duration::from_secs(60))
        .await
        .unwrap();
    running.shutdown().await.unwrap();

    // Once the first stopped (and the server saw its lease's connection
    // close), the second takes over from its checkpoint.
    let taken = spawn_when_free(&second, &schema).await;
    assert!(taken.status().checkpoint >= reached);
    taken.wait_for(head, Duration::from_secs(60)).await.unwrap();
    taken.shutdown().await.unwrap();
    assert_eq!(
        assert_model_matches_checkpoint(&second, &schema).await,
        head
    );
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
    pg_support::execute(&format!("DROP SCHEMA {schema} CASCADE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_lost_its_lease_never_moves_the_checkpoint() {
    if pg_support::disabled() {
        return;
    }
    let schema = pg_support::fresh_schema();
    let application = format!("lease_{}", Uuid::now_v7().simple());
    let mut first_config = config(&schema);
    first_config.url = pg_support::url_with_application_name(&application);
    let first = Arc::new(pg_support::open(first_config));
    let second = Arc::new(pg_support::open(config(&schema)));
    create_tables(&schema);
    let head = fill(&first, 800, 20).await;

    // The first runner stops inside the batch that holds position 300.
    let gate = Arc::new(Semaphore::new(0));
    let mut held = Totals::new(&schema);
    held.gate = Some((Position(300), Arc::clone(&gate)));
    let stale = ProjectionHandle::spawn_read_model(Arc::clone(&first), projection_config(50), held)
        .await
        .unwrap();
    stale
        .wait_for(Position(200), Duration::from_secs(60))
        .await
        .unwrap();
    // Its lease's connection dies (as when a network partition cuts it off):
    // the server releases the advisory lock. Only that connection: the
    // runner's open transaction goes on.
    let admin = client().await;
    let terminated: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a \
             JOIN pg_locks l ON l.pid = a.pid \
             WHERE a.application_name = $1 AND l.locktype = 'advisory' AND l.granted",
            &[&application],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(terminated, 1, "the first store's lease connection");

    // The second process takes the lease (once the server noticed).
    let taker = spawn_when_free(&second, &schema).await;
    // The stale runner goes on and tries to commit its batch: fenced off.
    gate.add_permits(1);
    assert!(matches!(
        stale.wait_for(head, Duration::from_secs(60)).await,
        Err(ProjectionControlError::NotRunning {
            state: ProjectionState::Failed,
            ..
        })
    ));
    let error = stale.status().last_error.expect("why it failed").error;
    assert!(error.contains("lease"), "{error}");
    // Nor can it take the lease back while the second holds it.
    assert!(matches!(first.lease_checkpoint(NAME).await, Ok(None)));

    taker.wait_for(head, Duration::from_secs(60)).await.unwrap();
    taker.shutdown().await.unwrap();
    let _ = stale.shutdown().await;
    assert_eq!(
        assert_model_matches_checkpoint(&second, &schema).await,
        head
    );
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
    pg_support::execute(&format!("DROP SCHEMA {schema} CASCADE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_checkpoint_save_is_fenced_once_the_lease_is_taken_elsewhere() {
    if pg_support::disabled() {
        return;
    }
    let schema = pg_support::fresh_schema();
    let application = format!("plain_{}", Uuid::now_v7().simple());
    let mut first_config = config(&schema);
    first_config.url = pg_support::url_with_application_name(&application);
    let first = pg_support::open(first_config);
    let second = pg_support::open(config(&schema));
    let lease = first
        .lease_checkpoint("plain")
        .await
        .unwrap()
        .expect("free");
    assert!(second.lease_checkpoint("plain").await.unwrap().is_none());
    first.save_checkpoint("plain", Position(7)).await.unwrap();
    client()
        .await
        .execute(
            "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a \
             JOIN pg_locks l ON l.pid = a.pid \
             WHERE a.application_name = $1 AND l.locktype = 'advisory'",
            &[&application],
        )
        .await
        .unwrap();
    let taken = loop {
        if let Some(taken) = second.lease_checkpoint("plain").await.unwrap() {
            break taken;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(matches!(
        first.save_checkpoint("plain", Position(8)).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert_eq!(
        second.load_checkpoint("plain").await.unwrap(),
        Some(Position(7))
    );
    second.save_checkpoint("plain", Position(9)).await.unwrap();
    drop((lease, taken));
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
    pg_support::execute(&format!("DROP SCHEMA {schema} CASCADE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_session_holding_the_head_row_gets_busy_not_a_stall() {
    if pg_support::disabled() {
        return;
    }
    let config = pg_support::config()
        .lock_timeout(Duration::from_millis(200))
        .retries(1);
    let schema = config.schema.clone();
    let store = pg_support::open(config);
    let stream = StreamId::new("busy-1").unwrap();
    store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![NewEvent::new("A", vec![])],
        )
        .await
        .unwrap();

    let hung = client().await;
    hung.batch_execute(&format!(
        "BEGIN; SELECT position FROM {schema}.head FOR UPDATE"
    ))
    .await
    .unwrap();
    let refused = NewEvent::new("B", vec![1]);
    let refused_id = refused.event_id;
    // Bounded only so that a regression fails instead of hanging.
    let answer = tokio::time::timeout(
        Duration::from_secs(60),
        store.append(&stream, ExpectedVersion::Any, vec![refused]),
    )
    .await
    .expect("the writer stalled behind the hung session");
    match answer {
        Err(AppendError::Store(StoreError::Busy(_))) => {}
        other => panic!("expected Busy, got {other:?}"),
    }
    hung.batch_execute("ROLLBACK").await.unwrap();

    let later = store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![NewEvent::new("C", vec![])],
        )
        .await
        .unwrap();
    assert_eq!(later.first_position, Position(2), "no gap, nothing written");
    let log = whole_log(&store).await;
    assert!(log.iter().all(|e| e.event_id != refused_id));
    store.shutdown().await.unwrap();
    pg_support::execute(&format!("DROP SCHEMA {schema} CASCADE"));
}

/// The child: runs the read model until killed.
fn child(schema: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = Arc::new(pg_support::open(config(schema)));
        // The killed child's lease goes when the server notices its
        // connection closed.
        let _handle = loop {
            match ProjectionHandle::spawn_read_model(
                Arc::clone(&store),
                projection_config(64),
                Totals::new(schema),
            )
            .await
            {
                Ok(handle) => break handle,
                Err(ProjectionControlError::AlreadyRunning { .. }) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(other) => panic!("{other}"),
            }
        };
        std::future::pending::<()>().await;
    });
}

fn random_below(bound: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (nanos.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) % bound
}

#[test]
fn kill_9_in_the_middle_of_a_read_model_batch_leaves_it_equal_to_a_rebuild() {
    if let Ok(schema) = std::env::var(CHILD_ENV) {
        child(&schema);
        return;
    }
    if pg_support::disabled() {
        return;
    }
    let kills: u32 = std::env::var("ANNALS_PG_NODES_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let schema = pg_support::fresh_schema();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = runtime.block_on(async {
        let store = Arc::new(pg_support::open(config(&schema)));
        create_tables(&schema);
        fill(&store, 8000, 50).await;
        store
    });
    let head = store.head_position();
    let mut killed_mid_run = 0;
    let mut last = Position::START;
    for _ in 0..kills {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "kill_9_in_the_middle_of_a_read_model_batch_leaves_it_equal_to_a_rebuild",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &schema)
            .stdout(Stdio::null())
            .spawn()
            .expect("start the child");
        // Kill once it made progress, a random moment later: most of its
        // time is spent inside a batch's open transaction.
        runtime.block_on(async {
            for _ in 0..6000 {
                let checkpoint = store.load_checkpoint(NAME).await.unwrap();
                if checkpoint.unwrap_or(Position::START) > last || checkpoint == Some(head) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(random_below(40))).await;
        });
        child.kill().expect("SIGKILL the child"); // SIGKILL on Unix
        assert!(!child.wait().unwrap().success(), "killed, not exited");
        last = runtime.block_on(assert_model_matches_checkpoint(&store, &schema));
        eprintln!("killed at checkpoint {last} of {head}");
        if last < head {
            killed_mid_run += 1;
        }
    }
    assert!(killed_mid_run > 0, "no kill landed before the end");

    // Restarted here, it finishes the log exactly once.
    runtime.block_on(async {
        let handle = loop {
            match ProjectionHandle::spawn_read_model(
                Arc::clone(&store),
                projection_config(64),
                Totals::new(&schema),
            )
            .await
            {
                Ok(handle) => break handle,
                Err(ProjectionControlError::AlreadyRunning { .. }) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(other) => panic!("{other}"),
            }
        };
        handle
            .wait_for(head, Duration::from_secs(120))
            .await
            .unwrap();
        handle.shutdown().await.unwrap();
        assert_eq!(assert_model_matches_checkpoint(&store, &schema).await, head);
        store.shutdown().await.unwrap();
    });
    pg_support::execute(&format!("DROP SCHEMA {schema} CASCADE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runtimes_on_one_schema_serialize_each_aggregate() {
    if pg_support::disabled() {
        return;
    }
    use annals::runtime::{Runtime, RuntimeConfig};
    use annals::CommandError;

    let schema = pg_support::fresh_schema();
    let runtime_config = || {
        RuntimeConfig::builder()
            .max_conflict_retries(1000)
            .build()
            .unwrap()
    };
    let nodes: Vec<Runtime<PostgresStore>> = (0..2)
        .map(|_| {
            Runtime::new(
                Arc::new(pg_support::open(config(&schema))),
                runtime_config(),
            )
        })
        .collect();

    // A write by the other process passivates the idle actor here.
    let (here, there) = (
        nodes[0].aggregates::<Tally>(),
        nodes[1].aggregates::<Tally>(),
    );
    here.execute("solo", Add(0)).await.unwrap();
    assert!(here.is_live("solo"));
    there.execute("solo", Add(0)).await.unwrap();
    let mut waited = 0;
    while here.is_live("solo") {
        waited += 1;
        assert!(waited < 3000, "the actor was never passivated");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let third = here.execute("solo", Add(0)).await.unwrap();
    assert_eq!(third.version.0, 3);

    // Many tasks on both, over hot and cold aggregates.
    let commands: u64 = std::env::var("ANNALS_PG_NODES_COMMANDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..16u64 {
        let aggregates = nodes[(task % 2) as usize].aggregates::<Tally>();
        tasks.spawn(async move {
            let mut acked = Vec::new();
            let mut refused = Vec::new();
            for n in 0..commands {
                let tag = task * 1_000_000 + n + 1;
                let id = if n % 3 == 0 {
                    format!("cold{task}")
                } else {
                    format!("hot{}", (n + task) % 3)
                };
                match aggregates.execute(&id, Add(tag)).await {
                    Ok(done) => acked.push((format!("tally-{id}"), done.version.0, tag)),
                    Err(CommandError::Conflict { .. }) => refused.push(tag),
                    Err(other) => panic!("{other}"),
                }
            }
            (acked, refused)
        });
    }
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    while let Some(done) = tasks.join_next().await {
        let (a, r) = done.unwrap();
        acked.extend(a);
        refused.extend(r);
    }

    let log = whole_log(&**nodes[0].store()).await;
    let mut versions: BTreeMap<&str, u64> = BTreeMap::new();
    let mut stored: std::collections::HashMap<u64, (&str, u64)> = Default::default();
    for event in &log {
        let version = versions.entry(event.stream_id.as_str()).or_default();
        *version += 1;
        assert_eq!(
            event.version.0, *version,
            "versions 1..n in {}",
            event.stream_id
        );
        let TallyEvent::Added { tag } = annals::codec::decode_event::<TallyEvent>(event).unwrap();
        if tag > 0 {
            assert!(
                stored
                    .insert(tag, (event.stream_id.as_str(), event.version.0))
                    .is_none(),
                "tag {tag} stored twice"
            );
        }
    }
    for (stream, version, tag) in &acked {
        assert_eq!(
            stored.get(tag),
            Some(&(stream.as_str(), *version)),
            "acknowledged command {tag} not stored where it was acknowledged"
        );
    }
    for tag in &refused {
        assert!(!stored.contains_key(tag), "a refused command was stored");
    }
    assert_eq!(acked.len() + refused.len(), 16 * commands as usize);
    assert!(!acked.is_empty());
    for id in ["hot0", "hot1", "hot2"] {
        let count = here.state(id).await.unwrap().count;
        assert_eq!(count, versions[format!("tally-{id}").as_str()], "{id}");
    }
    eprintln!(
        "two runtimes: acknowledged={} conflicts_exhausted={} events={}",
        acked.len(),
        refused.len(),
        log.len()
    );
    for node in &nodes {
        node.shutdown().await.unwrap();
    }
    pg_support::execute(&format!("DROP SCHEMA {schema} CASCADE"));
}
