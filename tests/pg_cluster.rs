//! Several processes on one PostgreSQL schema under `kill -9`.
//!
//! The parent re-runs this test binary as 3 children sharing one schema.
//! Each child appends raw events from several tasks (hot streams every child
//! writes, cold streams of its own; `ExpectedVersion::Any`, and `Exact` on
//! a version it just read, which conflicts across processes), runs commands
//! through a runtime over hot aggregates (every child) and cold ones (its
//! own), runs a subscription from its saved checkpoint, and stands by for
//! the read-model projection `cluster-rm` (PostgreSQL tables, exactly once):
//! one child at a time holds its lease and runs it; when that child is
//! killed, another takes over. Each child prints every acknowledged event
//! and command, every refused event id and command, and every delivered
//! position. The parent kills a random child with SIGKILL every second or
//! two and starts it again. Afterwards: positions are 1..N, versions 1..n
//! per stream, every acknowledged event and command is stored where it was
//! acknowledged (payload or tag), nothing refused is stored, each run of
//! each subscriber delivered one contiguous run of positions from its
//! checkpoint, and the read model equals a rebuild from the log, both at
//! the checkpoint the kills left and after it is run to the head.
//!
//! `ANNALS_PG_CLUSTER_KILLS=N cargo test --release --test pg_cluster --
//! --nocapture` runs N kills (default 6, a bounded run for CI) and ends with
//! the line `pg_cluster processes=3 kills=K acknowledged_checked=M lost=0
//! duplicate_versions=0 skipped=0 reordered=0`.

mod pg_support;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use annals::projection::{subscribe, ProjectionControlError};
use annals::runtime::{Runtime, RuntimeConfig};
use annals::store::{AppendError, EventFilter, PostgresConfig, PostgresStore, ReadDirection};
use annals::{
    CommandError, EventStore, ExpectedVersion, NewEvent, Position, ProjectionConfig,
    ProjectionHandle, StoreError, StreamId,
};
use pg_support::models::{create_tables, rebuilt, stored_model, Add, Tally, TallyEvent, Totals};
use uuid::Uuid;

/// The read-model projection the children share (one runs it at a time).
const READ_MODEL: &str = "cluster-rm";

fn read_model_config() -> ProjectionConfig {
    ProjectionConfig::builder(READ_MODEL)
        .batch_size(128)
        .build()
        .unwrap()
}

/// Starts the read model once its lease is free (standing by meanwhile).
async fn run_read_model(store: Arc<PostgresStore>, schema: String) -> ProjectionHandle {
    loop {
        match ProjectionHandle::spawn_read_model(
            Arc::clone(&store),
            read_model_config(),
            Totals::new(&schema),
        )
        .await
        {
            Ok(handle) => return handle,
            Err(ProjectionControlError::AlreadyRunning { .. }) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(other) => panic!("read model: {other}"),
        }
    }
}

const CHILD_SCHEMA: &str = "ANNALS_PG_CLUSTER_SCHEMA";
const CHILD_SLOT: &str = "ANNALS_PG_CLUSTER_SLOT";
const PROCESSES: usize = 3;

/// The payload is a function of the event id, so the parent checks every
/// acknowledged event byte for byte without being told its payload.
fn payload_for(event_id: Uuid) -> Vec<u8> {
    let bytes = event_id.as_bytes();
    let len = 8 + (bytes[15] as usize % 8) * 31;
    (0..len).map(|i| bytes[i % 16] ^ (i as u8)).collect()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn config(schema: &str) -> PostgresConfig {
    PostgresConfig::new(pg_support::url())
        .schema(schema)
        .pool_size(3)
        .poll_interval(Duration::from_millis(50))
}

/// The child's role: appends, commands, a subscription and the read model
/// until killed, reporting `ACK id stream version position`, `REFUSED id`,
/// `CMD tag stream version position`, `CMDREFUSED tag`, `FROM position` and
/// `SUB position` lines.
#[test]
#[ignore = "run by several_processes_survive_kill_9 as a child process"]
fn cluster_child() {
    let Ok(schema) = std::env::var(CHILD_SCHEMA) else {
        return;
    };
    let slot: u64 = std::env::var(CHILD_SLOT).unwrap().parse().unwrap();
    // The parent drops the children's stderr; run one by hand with
    // RUST_LOG to see it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = Arc::new(pg_support::open(config(&schema)));
        let (lines, mut printed) = tokio::sync::mpsc::unbounded_channel::<String>();
        for task in 0..6u64 {
            let store = Arc::clone(&store);
            let lines = lines.clone();
            tokio::spawn(async move {
                let seed = std::process::id() as u64 * 131 + task;
                let mut rng = Rng(seed | 1);
                loop {
                    let stream = if rng.next() % 2 == 0 {
                        format!("hot-{}", rng.next() % 4)
                    } else {
                        format!("cold{slot}-{task}")
                    };
                    let stream = StreamId::new(stream).unwrap();
                    let events: Vec<NewEvent> = (0..1 + rng.next() % 3)
                        .map(|_| {
                            let id = Uuid::now_v7();
                            NewEvent::new("Noted", payload_for(id)).with_id(id)
                        })
                        .collect();
                    let mut expected = ExpectedVersion::Any;
                    if rng.next() % 3 == 0 {
                        if let Ok(version) = store.stream_version(&stream).await {
                            expected = ExpectedVersion::Exact(version);
                        }
                    }
                    // Retried with the same ids until answered for sure.
                    let outcome = loop {
                        match store.append(&stream, expected, events.clone()).await {
                            Err(AppendError::Store(StoreError::OutcomeUnknown(_)))
                            | Err(AppendError::Store(StoreError::Backend(_))) => {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            other => break other,
                        }
                    };
                    match outcome {
                        Ok(result) => {
                            for (offset, event) in events.iter().enumerate() {
                                let offset = offset as u64;
                                let _ = lines.send(format!(
                                    "ACK {} {stream} {} {}",
                                    event.event_id,
                                    result.first_version.0 + offset,
                                    result.first_position.0 + offset
                                ));
                            }
                        }
                        Err(AppendError::WrongExpectedVersion { .. }) => {
                            for event in &events {
                                let _ = lines.send(format!("REFUSED {}", event.event_id));
                            }
                        }
                        Err(error) => panic!("unexpected append error: {error}"),
                    }
                }
            });
        }
        // Commands through the runtime: hot aggregates every child runs,
        // cold ones of its own. Tags are unique across every run.
        let runtime = Runtime::new(
            Arc::clone(&store),
            RuntimeConfig::builder()
                .max_conflict_retries(50)
                .build()
                .unwrap(),
        );
        for task in 0..4u64 {
            let tallies = runtime.aggregates::<Tally>();
            let lines = lines.clone();
            tokio::spawn(async move {
                let mut rng = Rng((std::process::id() as u64 * 977 + task) | 1);
                let mut n = 0u64;
                loop {
                    n += 1;
                    let tag = ((std::process::id() as u64) << 32) | (task << 24) | n;
                    let id = if rng.next() % 2 == 0 {
                        format!("hot{}", rng.next() % 3)
                    } else {
                        format!("cold{slot}x{task}")
                    };
                    match tallies.execute(&id, Add(tag)).await {
                        Ok(done) => {
                            let position = done.position.expect("one event").0;
                            let _ = lines.send(format!(
                                "CMD {tag} tally-{id} {} {position}",
                                done.version.0
                            ));
                        }
                        Err(CommandError::Conflict { .. }) => {
                            let _ = lines.send(format!("CMDREFUSED {tag}"));
                        }
                        // Outcome unknown (a connection lost at commit):
                        // neither acknowledged nor refused.
                        Err(CommandError::Store(_)) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(other) => panic!("unexpected command error: {other}"),
                    }
                }
            });
        }
        {
            let store = Arc::clone(&store);
            let schema = schema.clone();
            tokio::spawn(async move {
                // Held until the child dies: a dropped handle stops it.
                let _running = run_read_model(store, schema).await;
                std::future::pending::<()>().await;
            });
        }
        {
            let store = Arc::clone(&store);
            let lines = lines.clone();
            tokio::spawn(async move {
                let name = format!("cluster-{slot}");
                let from = store
                    .load_checkpoint(&name)
                    .await
                    .unwrap()
                    .unwrap_or(Position::START);
                let _ = lines.send(format!("FROM {}", from.0));
                let mut subscription = subscribe(store.clone(), from, EventFilter::All);
                let mut delivered = 0u64;
                while let Some(event) = subscription.next().await {
                    let event = event.expect("subscription");
                    let _ = lines.send(format!("SUB {}", event.position.0));
                    delivered += 1;
                    if delivered % 25 == 0 {
                        let _ = store.save_checkpoint(&name, event.position).await;
                    }
                }
            });
        }
        drop(lines);
        let mut stdout = std::io::stdout();
        // The harness printed `test cluster_child ... ` without a newline.
        let _ = writeln!(stdout);
        while let Some(line) = printed.recv().await {
            let _ = writeln!(stdout, "{line}");
        }
    });
}

/// One acknowledged event as the child reported it.
#[derive(Debug)]
struct Ack {
    stream: String,
    version: u64,
    position: u64,
}

fn spawn_child(
    schema: &str,
    slot: usize,
    run: usize,
    sink: mpsc::Sender<(usize, String)>,
) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cluster_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_SCHEMA, schema)
        .env(CHILD_SLOT, slot.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sink.send((run, line)).is_err() {
                break;
            }
        }
    });
    child
}

#[test]
fn several_processes_survive_kill_9() {
    if pg_support::disabled() {
        return;
    }
    let kills: usize = std::env::var("ANNALS_PG_CLUSTER_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let schema = pg_support::fresh_schema();
    // Created once here, so that the children start on an existing schema.
    drop(pg_support::open(config(&schema)));
    create_tables(&schema);

    let (sink, received) = mpsc::channel::<(usize, String)>();
    let mut next_run = 0;
    let mut children: Vec<Child> = (0..PROCESSES)
        .map(|slot| {
            next_run += 1;
            spawn_child(&schema, slot, next_run - 1, sink.clone())
        })
        .collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(800 + rng.next() % 1200));
        let slot = (rng.next() % PROCESSES as u64) as usize;
        children[slot].kill().unwrap();
        children[slot].wait().unwrap();
        next_run += 1;
        children[slot] = spawn_child(&schema, slot, next_run - 1, sink.clone());
    }
    std::thread::sleep(Duration::from_secs(1));
    for child in &mut children {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    drop(sink);

    let mut acks: HashMap<Uuid, Ack> = HashMap::new();
    let mut refused: HashSet<Uuid> = HashSet::new();
    let mut commands: HashMap<u64, Ack> = HashMap::new();
    let mut refused_commands: HashSet<u64> = HashSet::new();
    // Per run of a child: where its subscription started, what it delivered.
    let mut runs: HashMap<usize, (Option<u64>, Vec<u64>)> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Ok((run, line)) =
        received.recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        let fields: Vec<&str> = line.split(' ').collect();
        match fields.as_slice() {
            ["ACK", id, stream, version, position] => {
                acks.insert(
                    id.parse().unwrap(),
                    Ack {
                        stream: stream.to_string(),
                        version: version.parse().unwrap(),
                        position: position.parse().unwrap(),
                    },
                );
            }
            ["REFUSED", id] => {
                refused.insert(id.parse().unwrap());
            }
            ["CMD", tag, stream, version, position] => {
                commands.insert(
                    tag.parse().unwrap(),
                    Ack {
                        stream: stream.to_string(),
                        version: version.parse().unwrap(),
                        position: position.parse().unwrap(),
                    },
                );
            }
            ["CMDREFUSED", tag] => {
                refused_commands.insert(tag.parse().unwrap());
            }
            ["FROM", position] => runs.entry(run).or_default().0 = Some(position.parse().unwrap()),
            ["SUB", position] => runs
                .entry(run)
                .or_default()
                .1
                .push(position.parse().unwrap()),
            _ => {} // the test harness's own lines
        }
    }

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = Arc::new(pg_support::open(config(&schema)));
    let log = runtime.block_on(async {
        let mut log = Vec::new();
        loop {
            let page = store
                .read_all(
                    Position(log.len() as u64 + 1),
                    ReadDirection::Forward,
                    1000,
                    &EventFilter::All,
                )
                .await
                .unwrap();
            if page.is_empty() {
                break log;
            }
            log.extend(page);
        }
    });

    let mut gaps = 0;
    let mut duplicate_versions = 0;
    let mut versions: HashMap<&str, u64> = HashMap::new();
    let mut by_id = HashMap::new();
    for (index, event) in log.iter().enumerate() {
        if event.position.0 != index as u64 + 1 {
            gaps += 1;
        }
        let version = versions.entry(event.stream_id.as_str()).or_default();
        if event.version.0 != *version + 1 {
            duplicate_versions += 1;
        }
        *version = event.version.0;
        by_id.insert(event.event_id, event);
    }
    let mut lost = 0;
    for (id, ack) in &acks {
        match by_id.get(id) {
            Some(event)
                if event.stream_id.as_str() == ack.stream
                    && event.version.0 == ack.version
                    && event.position.0 == ack.position
                    && event.payload == payload_for(*id) => {}
            _ => lost += 1,
        }
    }
    let refused_stored = refused.iter().filter(|id| by_id.contains_key(id)).count();
    // Commands: each acknowledged tag is the event at its position.
    let mut tags: HashMap<u64, usize> = HashMap::new();
    for (index, event) in log.iter().enumerate() {
        if event.stream_id.as_str().starts_with("tally-") {
            let TallyEvent::Added { tag } = annals::codec::decode_event(event).unwrap();
            assert!(
                tags.insert(tag, index).is_none(),
                "command {tag} stored twice"
            );
        }
    }
    for (tag, ack) in &commands {
        match tags.get(tag).map(|&index| &log[index]) {
            Some(event)
                if event.stream_id.as_str() == ack.stream
                    && event.version.0 == ack.version
                    && event.position.0 == ack.position => {}
            _ => lost += 1,
        }
    }
    let refused_commands_stored = refused_commands
        .iter()
        .filter(|tag| tags.contains_key(tag))
        .count();

    // The read model: what the kills left equals a rebuild up to its
    // checkpoint; run to the head here, it equals a rebuild of the log.
    runtime.block_on(async {
        let checkpoint = store
            .load_checkpoint(READ_MODEL)
            .await
            .unwrap()
            .unwrap_or(Position::START);
        assert!(
            checkpoint > Position::START,
            "the read model never committed"
        );
        assert_eq!(
            stored_model(&schema).await,
            rebuilt(&log, checkpoint),
            "read model at checkpoint {checkpoint} differs from a rebuild"
        );
        let handle = run_read_model(Arc::clone(&store), schema.clone()).await;
        let head = Position(log.len() as u64);
        handle
            .wait_for(head, Duration::from_secs(60))
            .await
            .unwrap();
        handle.shutdown().await.unwrap();
        assert_eq!(
            stored_model(&schema).await,
            rebuilt(&log, head),
            "read model at the head differs from a rebuild"
        );
        store.shutdown().await.unwrap();
    });
    let (mut skipped, mut reordered) = (0, 0);
    for (from, delivered) in runs.values() {
        let mut previous = from.expect("a run delivered before saying where it started");
        for &position in delivered {
            if position <= previous {
                reordered += 1;
            } else if position != previous + 1 {
                skipped += 1;
            }
            previous = position;
        }
    }
    println!(
        "pg_cluster processes={PROCESSES} kills={kills} acknowledged_checked={} lost={lost} \
         duplicate_versions={duplicate_versions} skipped={skipped} reordered={reordered}",
        acks.len() + commands.len()
    );
    assert!(
        !acks.is_empty(),
        "no append was acknowledged: the test tested nothing"
    );
    assert!(!refused.is_empty(), "no append conflicted across processes");
    assert!(!commands.is_empty(), "no command was acknowledged");
    assert_eq!(
        (
            lost,
            duplicate_versions,
            gaps,
            skipped,
            reordered,
            refused_stored + refused_commands_stored
        ),
        (0, 0, 0, 0, 0, 0),
        "lost, duplicate versions, position gaps, skipped, reordered, refused but stored"
    );
    pg_support::execute(&format!("DROP SCHEMA {schema} CASCADE"));
}
