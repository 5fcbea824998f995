//! Crash safety (invariants I1 to I5) under real `kill -9`, with a mixed load.
//!
//! The parent re-runs this test binary as a child that, on one sled store
//! with the default durability, (a) appends raw events from many tasks,
//! (b) runs many ledger aggregates through the [`Runtime`] (snapshots every
//! few events, passivation and eviction so that actors reload from
//! snapshots), and (c) runs a [`SledProjection`] live. It prints every
//! acknowledged event (stream, version, position, event id and what the
//! event must hold) as it is acknowledged. The parent kills the child with
//! SIGKILL at a random moment (sometimes while it is still opening and
//! recovering), reopens the store and checks:
//!
//! - every acknowledged event is there, byte for byte, where it was
//!   acknowledged (and still is after every later crash of the same store);
//! - every stream's versions are 1..n and `$all` is 1..head, each event once;
//! - the stored ledger events obey the domain's rules;
//! - every snapshot decodes to the state a full replay gives at its version,
//!   and a fresh runtime (snapshot plus tail) agrees with a full replay;
//! - the projection's checkpoint is at or behind the head, and its read
//!   model equals a rebuild from the log up to that checkpoint;
//!
//! then starts the child again on the same store. A new store is begun
//! every `CYCLES_PER_STORE` cycles, so that every check can re-read the
//! whole store (each store is re-verified whole after each of its crashes).
//!
//! `ANNALS_CRASH_CYCLES=N cargo test --release --test crash -- --nocapture`
//! runs N cycles (default 5, a bounded run for CI) and ends with the line
//! `crash_cycles=N acknowledged_checked=M lost=0 gaps=0 duplicates=0`.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use annals::codec::{decode_event, decode_value, encode_event, encode_value};
use annals::projection::{ProjectionContext, ProjectionError, SledProjection};
use annals::store::{EventFilter, ReadDirection, ReadModelBatch};
use annals::{
    Aggregate, CommandContext, CommandError, EventStore, ExpectedVersion, NewEvent, Position,
    ProjectionConfig, ProjectionHandle, RecordedEvent, Runtime, RuntimeConfig, SledStore, StreamId,
    Version,
};
use common::child::{self, Child};
use common::{Ledger, LedgerCommand, LedgerEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const CHILD_DIR: &str = "ANNALS_CRASH_CHILD_DIR";
const CHILD_SEED: &str = "ANNALS_CRASH_CHILD_SEED";
/// Cycles run on one store before the next begins.
const CYCLES_PER_STORE: u64 = 100;
/// Ledger aggregates the child drives (more than it keeps live).
const LEDGERS: u64 = 48;
const SNAPSHOT_EVERY: u64 = 5;
const PROJECTION: &str = "crash-ledgers";
/// Ledger stream -> [`LedgerRow`].
const RM_LEDGERS: &str = "rm-ledgers";
/// Position (u64 BE) -> event id, for every event: each event applied once.
const RM_POSITIONS: &str = "rm-positions";
const READ_MODEL_TREES: [&str; 2] = [RM_LEDGERS, RM_POSITIONS];

/// The payload is a function of the event id, so the parent can check every
/// acknowledged raw event byte for byte without being told its payload.
fn payload_for(event_id: Uuid) -> Vec<u8> {
    let bytes = event_id.as_bytes();
    let len = 16 + (bytes[15] as usize % 8) * 97;
    (0..len).map(|i| bytes[i % 16] ^ (i as u8)).collect()
}

/// A tiny deterministic generator, so a failing cycle can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn hex(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "-".to_owned();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text == "-" {
        return Some(Vec::new());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

// ---------------------------------------------------------------------------
// The read model: one function of the events, run by the projection in the
// child and by the parent's rebuild.

/// What the read model keeps per ledger stream.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LedgerRow {
    balance: u64,
    events: u64,
    version: u64,
    /// Events whose version was not the previous one plus one: must stay 0.
    out_of_order: u64,
}

/// Where [`project`] reads and writes.
trait ReadModel {
    fn get(&mut self, tree: &'static str, key: &[u8]) -> Option<Vec<u8>>;
    fn put(&mut self, tree: &'static str, key: &[u8], value: Vec<u8>);
}

fn project(event: &RecordedEvent, model: &mut dyn ReadModel) {
    model.put(
        RM_POSITIONS,
        &event.position.0.to_be_bytes(),
        event.event_id.as_bytes().to_vec(),
    );
    if event.stream_id.category() != Ledger::CATEGORY {
        return;
    }
    let key = event.stream_id.as_str().as_bytes();
    let mut row: LedgerRow = model
        .get(RM_LEDGERS, key)
        .map(|bytes| decode_value(&bytes).expect("a row decodes"))
        .unwrap_or_default();
    if event.version.0 != row.version + 1 {
        row.out_of_order += 1;
    }
    row.version = event.version.0;
    row.events += 1;
    match decode_event::<LedgerEvent>(event).expect("a ledger event decodes") {
        LedgerEvent::Deposited { amount } => row.balance += amount,
        LedgerEvent::Withdrawn { amount } => row.balance = row.balance.wrapping_sub(amount),
        _ => {}
    }
    model.put(RM_LEDGERS, key, encode_value(&row).unwrap());
}

/// The projection's view of the read model: a sled batch.
struct Staged<'b> {
    batch: &'b mut ReadModelBatch,
    error: Option<ProjectionError>,
}

impl ReadModel for Staged<'_> {
    fn get(&mut self, tree: &'static str, key: &[u8]) -> Option<Vec<u8>> {
        match self.batch.get_raw(tree, key) {
            Ok(value) => value.map(|v| v.to_vec()),
            Err(error) => {
                self.error.get_or_insert(error);
                None
            }
        }
    }

    fn put(&mut self, tree: &'static str, key: &[u8], value: Vec<u8>) {
        if let Err(error) = self.batch.put_raw(tree, key, value) {
            self.error.get_or_insert(error);
        }
    }
}

/// The rebuild's view: plain maps.
type Trees = BTreeMap<&'static str, BTreeMap<Vec<u8>, Vec<u8>>>;

impl ReadModel for Trees {
    fn get(&mut self, tree: &'static str, key: &[u8]) -> Option<Vec<u8>> {
        BTreeMap::get(self, tree)?.get(key).cloned()
    }

    fn put(&mut self, tree: &'static str, key: &[u8], value: Vec<u8>) {
        self.entry(tree).or_default().insert(key.to_vec(), value);
    }
}

struct LedgerProjection;

impl SledProjection for LedgerProjection {
    fn trees(&self) -> Vec<String> {
        READ_MODEL_TREES.iter().map(|t| (*t).to_owned()).collect()
    }

    fn handle(
        &mut self,
        event: &RecordedEvent,
        batch: &mut ReadModelBatch,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        let mut staged = Staged { batch, error: None };
        project(event, &mut staged);
        staged.error.map_or(Ok(()), Err)
    }
}

// ---------------------------------------------------------------------------
// The child.

fn open_store(dir: &str) -> SledStore {
    // The parent's handles are all dropped before the child starts, but sled
    // may release the directory's lock a moment later.
    // A small stream index flush: kills land in its flushes and in its
    // tail, both of which the next open must get right.
    let config = annals::store::SledStoreConfig::new(dir).stream_index_flush_events(64);
    for _ in 0..500 {
        match SledStore::open_with(config.clone()) {
            Ok(store) => return store,
            Err(annals::StoreError::InUse { .. }) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => panic!("{error}"),
        }
    }
    panic!("the store stayed locked");
}

fn random_command(rng: &mut Rng) -> LedgerCommand {
    let amount = 1 + rng.next() % 50;
    match rng.next() % 100 {
        0..=4 => LedgerCommand::Open,
        5..=39 => LedgerCommand::Deposit(amount),
        40..=64 => LedgerCommand::Withdraw(amount + 10), // often refused
        65..=79 => LedgerCommand::DepositTwice(amount),
        80..=97 => LedgerCommand::Note(rng.next() % 1000),
        98 => LedgerCommand::Nothing,
        _ => LedgerCommand::PanicInHandle, // retires the actor mid-load
    }
}

/// The child's role: raw appends, aggregate commands and a projection, until
/// killed, reporting each acknowledged event.
#[test]
#[ignore = "run by crash_cycles_lose_nothing as a child process"]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let seed: u64 = std::env::var(CHILD_SEED).unwrap().parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = Arc::new(open_store(&dir));
        let (acks, mut acked) = tokio::sync::mpsc::unbounded_channel::<String>();

        // Raw appends to streams no aggregate owns.
        for task in 0..8u64 {
            let store = Arc::clone(&store);
            let acks = acks.clone();
            tokio::spawn(async move {
                let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(task) | 1);
                loop {
                    let stream = StreamId::new(format!("crash-{}", rng.next() % 64)).unwrap();
                    let count = 1 + (rng.next() % 4) as usize;
                    let events: Vec<NewEvent> = (0..count)
                        .map(|_| {
                            let id = Uuid::now_v7();
                            NewEvent::new("Happened", payload_for(id)).with_id(id)
                        })
                        .collect();
                    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
                    if let Ok(done) = store.append(&stream, ExpectedVersion::Any, events).await {
                        for (offset, id) in ids.iter().enumerate() {
                            let version = done.first_version.0 + offset as u64;
                            let position = done.first_position.0 + offset as u64;
                            let _ = acks.send(format!("ACK {stream} {version} {position} {id}"));
                        }
                    }
                }
            });
        }

        // Aggregates: fewer live actors than ledgers and a short idle
        // timeout, so actors are evicted and reloaded from snapshots.
        let config = RuntimeConfig::builder()
            .snapshot_every(SNAPSHOT_EVERY)
            .max_live_aggregates(24)
            .idle_timeout(Duration::from_millis(30))
            .build()
            .unwrap();
        let aggregates = Runtime::new(store.clone(), config).aggregates::<Ledger>();
        for task in 0..16u64 {
            let aggregates = aggregates.clone();
            let store = Arc::clone(&store);
            let acks = acks.clone();
            tokio::spawn(async move {
                let mut rng = Rng(seed.wrapping_mul(131).wrapping_add(task) | 1);
                loop {
                    let id = (rng.next() % LEDGERS).to_string();
                    let command = random_command(&mut rng);
                    let correlation = Uuid::now_v7();
                    let context = CommandContext::new(correlation, Uuid::now_v7());
                    let done = match aggregates.execute_with(&id, command, context).await {
                        Ok(done) => done,
                        Err(CommandError::Domain(_) | CommandError::AggregatePanicked { .. }) => {
                            continue
                        }
                        Err(other) => {
                            let _ = acks.send(format!("FAIL ledger-{id}: {other}"));
                            continue;
                        }
                    };
                    let Some(last_position) = done.position else {
                        continue;
                    };
                    // The reply says what was stored; the event ids are
                    // only in the store, so read them back.
                    let stream = StreamId::new(format!("ledger-{id}")).unwrap();
                    let count = done.events.len() as u64;
                    let first = Version(done.version.0 + 1 - count);
                    let stored = store
                        .read_stream(&stream, first, ReadDirection::Forward, count as usize)
                        .await
                        .unwrap();
                    for (offset, event) in done.events.iter().enumerate() {
                        let version = first.0 + offset as u64;
                        let position = last_position.0 + 1 - count + offset as u64;
                        let encoded = encode_event(event).unwrap();
                        let line = match stored.get(offset) {
                            Some(s) if s.version.0 == version && s.position.0 == position => {
                                format!(
                                    "CMD {stream} {version} {position} {} {correlation} {} {}",
                                    s.event_id,
                                    encoded.event_type,
                                    hex(&encoded.payload)
                                )
                            }
                            other => format!("FAIL {stream} {version} {position}: {other:?}"),
                        };
                        let _ = acks.send(line);
                    }
                }
            });
        }

        let projection = ProjectionHandle::spawn_sled(
            Arc::clone(&store),
            ProjectionConfig::builder(PROJECTION)
                .checkpoint_every(32, Duration::from_millis(5))
                .batch_size(16)
                .build()
                .unwrap(),
            LedgerProjection,
        )
        .await
        .unwrap();
        drop(acks);
        // One printer, so lines never interleave; println! flushes per line
        // only on a terminal, so flush explicitly for the pipe.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        while let Some(line) = acked.recv().await {
            writeln!(out, "{line}").unwrap();
            out.flush().unwrap();
        }
        drop(projection);
    });
}

// ---------------------------------------------------------------------------
// The parent.

/// An acknowledged event and what it must hold.
#[derive(Debug)]
struct Ack {
    stream: String,
    version: u64,
    position: u64,
    event_type: String,
    payload: Vec<u8>,
    correlation: Option<Uuid>,
}

/// The line from its `ACK ` or `CMD ` marker on, if it has one.
fn marker(line: &str) -> Option<&str> {
    ["ACK ", "CMD "]
        .iter()
        .filter_map(|m| line.find(m))
        .min()
        .map(|at| &line[at..])
}

fn parse(line: &str) -> Option<(Uuid, Ack)> {
    // libtest prints `test crash_child ... ` with no newline before the
    // child's own output, so the first marker may start mid-line.
    let line = marker(line)?;
    if let Some(rest) = line.strip_prefix("ACK ") {
        let mut parts = rest.split(' ');
        let stream = parts.next()?.to_owned();
        let version = parts.next()?.parse().ok()?;
        let position = parts.next()?.parse().ok()?;
        let id = parts.next()?.parse().ok()?;
        return Some((
            id,
            Ack {
                stream,
                version,
                position,
                event_type: "Happened".to_owned(),
                payload: payload_for(id),
                correlation: None,
            },
        ));
    }
    let mut parts = line.strip_prefix("CMD ")?.split(' ');
    let stream = parts.next()?.to_owned();
    let version = parts.next()?.parse().ok()?;
    let position = parts.next()?.parse().ok()?;
    let id = parts.next()?.parse().ok()?;
    let correlation = Some(parts.next()?.parse().ok()?);
    let event_type = parts.next()?.to_owned();
    let payload = unhex(parts.next()?)?;
    Some((
        id,
        Ack {
            stream,
            version,
            position,
            event_type,
            payload,
            correlation,
        },
    ))
}

/// Runs one child, kills it, returns what it acknowledged (the last line
/// may be cut by the kill and is then ignored) and how many commands the
/// runtime acknowledged. `wait_for_load`: kill only after the first
/// acknowledgement plus `run_for`; otherwise `run_for` after the start,
/// perhaps while the child is still recovering.
fn run_and_kill(
    dir: &Path,
    seed: u64,
    run_for: Duration,
    wait_for_load: bool,
) -> (HashMap<Uuid, Ack>, u64) {
    let mut command = child::ignored_test(module_path!(), "crash_child");
    command
        .env(CHILD_DIR, dir)
        .env(CHILD_SEED, seed.to_string())
        .stderr(Stdio::null());
    let mut child = Child::spawn(command);
    if wait_for_load {
        child.wait_for_line(Duration::from_secs(60), |line| marker(line).is_some());
    }
    std::thread::sleep(run_for);
    let lines = child.kill(); // SIGKILL
    let failures: Vec<&String> = lines.iter().filter(|l| l.starts_with("FAIL")).collect();
    assert!(failures.is_empty(), "the child reported: {failures:?}");
    let commands = lines
        .iter()
        .filter(|l| l.starts_with("CMD "))
        .filter_map(|l| l.split(' ').nth(5))
        .collect::<HashSet<_>>()
        .len() as u64;
    (lines.iter().filter_map(|l| parse(l)).collect(), commands)
}

#[derive(Debug, Default)]
struct Findings {
    /// Distinct acknowledged events verified (each again after every later
    /// crash of its store).
    checked: u64,
    rechecks: u64,
    lost: u64,
    gaps: u64,
    duplicates: u64,
    commands: u64,
    snapshots_checked: u64,
    aggregates_checked: u64,
    projection_events_checked: u64,
    early_kills: u64,
}

/// Whether `handle` could have decided `event` on `state`: the domain's
/// rules, checked on what is stored.
fn allowed(state: &Ledger, event: &LedgerEvent) -> bool {
    match event {
        LedgerEvent::Opened => !state.open,
        LedgerEvent::Withdrawn { amount } => state.open && *amount <= state.balance,
        LedgerEvent::Deposited { .. } | LedgerEvent::Noted { .. } => state.open,
        LedgerEvent::Poisoned => false,
    }
}

async fn check_store(
    dir: &Path,
    acked: &HashMap<Uuid, Ack>,
    new_acks: u64,
    findings: &mut Findings,
) {
    let store = Arc::new(SledStore::open(dir).expect("the store reopens after kill -9"));
    let head = store.head_position();
    let all = store
        .read_all(
            Position::START,
            ReadDirection::Forward,
            usize::MAX,
            &EventFilter::All,
        )
        .await
        .unwrap();
    // $all: positions 1..=head, each once.
    for (index, event) in all.iter().enumerate() {
        if event.position.0 != index as u64 + 1 {
            findings.gaps += 1;
        }
    }
    if all.len() as u64 != head.0 {
        findings.gaps += 1;
    }
    // Streams: versions 1..=n, each event id once.
    let mut streams: BTreeMap<&str, Vec<&RecordedEvent>> = BTreeMap::new();
    let mut ids = HashSet::new();
    for event in &all {
        streams
            .entry(event.stream_id.as_str())
            .or_default()
            .push(event);
        if !ids.insert(event.event_id) {
            findings.duplicates += 1;
        }
    }
    for (stream, events) in &streams {
        let stream = StreamId::new(stream).unwrap();
        let head = store.stream_version(&stream).await.unwrap();
        if events
            .iter()
            .enumerate()
            .any(|(i, e)| e.version.0 != i as u64 + 1)
            || head.0 != events.len() as u64
        {
            findings.gaps += 1;
        }
    }
    // Every acknowledged event, byte for byte, where it was acknowledged.
    let by_id: HashMap<Uuid, &RecordedEvent> = all.iter().map(|e| (e.event_id, e)).collect();
    for (id, ack) in acked {
        let intact = by_id.get(id).is_some_and(|event| {
            event.stream_id.as_str() == ack.stream
                && event.version == Version(ack.version)
                && event.position == Position(ack.position)
                && event.event_type == ack.event_type
                && event.payload == ack.payload
                && event.metadata.correlation_id == ack.correlation
        });
        if !intact {
            findings.lost += 1;
        }
    }
    findings.checked += new_acks;
    findings.rechecks += acked.len() as u64;

    check_ledgers(&store, &streams, findings).await;
    check_read_model(&store, &all, findings).await;

    // Appends continue with no gap and no reuse.
    let stream = StreamId::new("crash-check").unwrap();
    let before = store.stream_version(&stream).await.unwrap();
    let done = store
        .append(
            &stream,
            ExpectedVersion::Exact(before),
            vec![NewEvent::new("Checked", vec![])],
        )
        .await
        .unwrap();
    assert_eq!(done.first_position, head.next());
    assert_eq!(done.first_version, before.next());

    // State from snapshot plus tail (a fresh runtime that takes no snapshot
    // of its own) equals state from a full replay, for every ledger.
    let runtime = Runtime::new(
        store.clone(),
        RuntimeConfig::builder().snapshot_every(0).build().unwrap(),
    );
    let ledgers = runtime.aggregates::<Ledger>();
    for (stream, events) in &streams {
        let Some(id) = stream.strip_prefix("ledger-") else {
            continue;
        };
        let replayed = replay(events).0;
        assert_eq!(
            ledgers.state(id).await.unwrap(),
            replayed,
            "{stream}: the runtime's recovery differs from a full replay"
        );
        findings.aggregates_checked += 1;
    }
    runtime.shutdown().await.unwrap();
}

/// Full replay of a ledger stream: the state after each event, checking the
/// domain's rules on the way. `states[v]` is the state at version `v`.
fn replay(events: &[&RecordedEvent]) -> (Ledger, Vec<Ledger>) {
    let mut state = Ledger::default();
    let mut states = vec![state.clone()];
    for recorded in events {
        let event = decode_event::<LedgerEvent>(recorded).expect("a ledger event decodes");
        assert!(
            allowed(&state, &event),
            "{} v{}: {event:?} breaks the rules on {state:?}",
            recorded.stream_id,
            recorded.version
        );
        state.apply(&event);
        states.push(state.clone());
    }
    (state, states)
}

/// Every stored snapshot decodes to the full replay's state at its version.
async fn check_ledgers(
    store: &SledStore,
    streams: &BTreeMap<&str, Vec<&RecordedEvent>>,
    findings: &mut Findings,
) {
    for (stream, events) in streams {
        if !stream.starts_with("ledger-") {
            continue;
        }
        let (_, states) = replay(events);
        let id = StreamId::new(stream).unwrap();
        let Some(snapshot) = store.load_snapshot(&id).await.unwrap() else {
            continue;
        };
        let version = usize::try_from(snapshot.version.0).unwrap();
        assert!(
            version < states.len(),
            "{stream}: snapshot at {} beyond the stream's {}",
            snapshot.version,
            events.len()
        );
        let decoded: Ledger = decode_value(&snapshot.payload).expect("the snapshot decodes");
        assert_eq!(
            decoded, states[version],
            "{stream}: snapshot at {} differs from a full replay",
            snapshot.version
        );
        findings.snapshots_checked += 1;
    }
}

/// The checkpoint is at or behind the head, and the read model holds
/// exactly what a rebuild from the log up to the checkpoint gives.
async fn check_read_model(store: &SledStore, all: &[RecordedEvent], findings: &mut Findings) {
    let head = store.head_position();
    let checkpoint = store
        .load_checkpoint(PROJECTION)
        .await
        .unwrap()
        .unwrap_or(Position::START);
    assert!(
        checkpoint <= head,
        "checkpoint {checkpoint} beyond head {head}"
    );
    let mut rebuilt = Trees::new();
    for event in all.iter().take_while(|e| e.position <= checkpoint) {
        project(event, &mut rebuilt);
    }
    for tree in READ_MODEL_TREES {
        let stored: BTreeMap<Vec<u8>, Vec<u8>> = store
            .read_model::<[u8], ()>(tree)
            .unwrap()
            .iter_raw()
            .unwrap()
            .into_iter()
            .collect();
        let expected = rebuilt.remove(tree).unwrap_or_default();
        if stored != expected {
            let missing = expected.keys().filter(|k| !stored.contains_key(*k)).count();
            let extra = stored.keys().filter(|k| !expected.contains_key(*k)).count();
            panic!(
                "read model {tree} differs from a rebuild up to checkpoint {checkpoint}: \
                 {} entries vs {} ({missing} missing, {extra} extra)",
                stored.len(),
                expected.len()
            );
        }
        if tree == RM_LEDGERS {
            for value in stored.values() {
                let row: LedgerRow = decode_value(value).unwrap();
                assert_eq!(row.out_of_order, 0, "the projection saw a gap: {row:?}");
            }
        }
    }
    findings.projection_events_checked += checkpoint.0;
}

#[test]
fn crash_cycles_lose_nothing() {
    let cycles: u64 = crate::common::setting("ANNALS_CRASH_CYCLES", 5);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut findings = Findings::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let started = Instant::now();
    let mut dir = tempfile::tempdir().unwrap();
    let mut acked = HashMap::new();
    for cycle in 0..cycles {
        if cycle > 0 && cycle % CYCLES_PER_STORE == 0 {
            dir = tempfile::tempdir().unwrap();
            acked.clear();
        }
        // One cycle in eight is killed while the child may still be opening
        // the store, recovering aggregates or catching the projection up.
        let early = cycle % 8 == 3;
        let run_for = if early {
            Duration::from_millis(rng.next() % 60)
        } else {
            Duration::from_millis(20 + rng.next() % 130)
        };
        let (new, commands) = run_and_kill(dir.path(), cycle + 1, run_for, !early);
        if early {
            findings.early_kills += 1;
        } else {
            assert!(
                !new.is_empty(),
                "cycle {cycle}: the child acknowledged nothing"
            );
        }
        findings.commands += commands;
        let new_acks = new.len() as u64;
        acked.extend(new);
        runtime.block_on(check_store(dir.path(), &acked, new_acks, &mut findings));
        assert_eq!(
            (findings.lost, findings.gaps, findings.duplicates),
            (0, 0, 0),
            "cycle {cycle}: {findings:?}"
        );
    }
    if cycles >= 4 {
        // The load did reach every part: commands, snapshots, projection.
        assert!(
            findings.commands > 0
                && findings.snapshots_checked > 0
                && findings.projection_events_checked > 0,
            "part of the load never ran: {findings:?}"
        );
    }
    eprintln!(
        "crash details: {findings:?} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "crash_cycles={cycles} acknowledged_checked={} lost={} gaps={} duplicates={}",
        findings.checked, findings.lost, findings.gaps, findings.duplicates,
    );
}
