//! Renamed event types read old records through the runtime, and an
//! unknown event type names its stream and version (the end of this file).
//!
//! Decoders fed arbitrary and mutated bytes never panic (invariant I6):
//! stored event records (written back into the `log` tree one to a chunk,
//! under `C` + position, docs/design.md), snapshot records (the `snapshots` tree, read
//! by the store and by the runtime's recovery), and payloads
//! (`decode_event_parts`, with an upcaster, and `decode_value`).
//!
//! The answer is always a value or a typed error; a damaged record never
//! disturbs its neighbours. `ANNALS_FUZZ_CASES=N` sets the cases per
//! property (default 2,000, under a second for the whole file; the long mode
//! runs millions).

use std::collections::BTreeMap;
use std::sync::Arc;

use annals::codec::{
    decode_event_parts, decode_value, encode_event, encode_value, CodecError, Upcasters,
};
use annals::store::{EventFilter, Metadata, ReadDirection, Snapshot};
use annals::{
    Aggregate, CommandError, DomainEvent, EventStore, ExpectedVersion, MemoryStore, NewEvent,
    Position, QueryError, RecordedEvent, Runtime, RuntimeConfig, SledStore, StreamId, Version,
};
use proptest::prelude::*;
use proptest::sample::Index;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::chunks::{chunk_key, single_chunk, stored_records};

fn cases() -> u32 {
    crate::common::setting("ANNALS_FUZZ_CASES", 2000)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        // A panic is the failure looked for; shrinking it is cheap.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// One edit of a valid encoding.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Set(Index, u8),
    Insert(Index, u8),
    Remove(Index),
    Truncate(Index),
    /// A large varint where a length or a tag is expected.
    HugeVarint(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 1..=255u8).prop_map(|(i, m)| Mutation::Flip(i, m)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Remove),
        any::<Index>().prop_map(Mutation::Truncate),
        any::<Index>().prop_map(Mutation::HugeVarint),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            bytes.push(0);
        }
        let len = bytes.len();
        match m {
            Mutation::Flip(i, mask) => bytes[i.index(len)] ^= mask,
            Mutation::Set(i, b) => bytes[i.index(len)] = *b,
            Mutation::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
            Mutation::Remove(i) => {
                bytes.remove(i.index(bytes.len()));
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
            Mutation::HugeVarint(i) => {
                let at = i.index(bytes.len());
                bytes.splice(
                    at..at,
                    [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
                );
            }
        }
    }
    bytes
}

/// Either arbitrary bytes or a mutation of `valid`.
fn input_from(valid: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..300),
        3 => (
            proptest::sample::select(valid),
            proptest::collection::vec(mutation(), 1..6)
        )
            .prop_map(|(bytes, mutations)| mutate(bytes, &mutations)),
    ]
}

// ---------------------------------------------------------------------------
// A domain with strings, sequences, options, maps, nested enums and an
// upcaster, so that the payload decoders meet every kind of serde shape.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Kind {
    Small,
    Sized(u32),
    Named { name: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum ShopEvent {
    Opened,
    Named(String),
    Priced {
        sku: String,
        cents: i64,
        tags: Vec<String>,
    },
    Tagged(BTreeMap<String, u16>, Option<Kind>),
    Scored(f64, bool, char, u128),
    /// Schema version 2; version 1 was a bare `u32`.
    Upgraded {
        amount: u64,
        note: String,
    },
}

impl DomainEvent for ShopEvent {
    fn schema_version(event_type: &str) -> u16 {
        if event_type == "Upgraded" {
            2
        } else {
            1
        }
    }

    fn upcasters(upcasters: &mut Upcasters) {
        upcasters.add("Upgraded", 1, |old: u32| (u64::from(old), String::new()));
    }
}

fn valid_events() -> Vec<ShopEvent> {
    vec![
        ShopEvent::Opened,
        ShopEvent::Named("corner shop ✓".into()),
        ShopEvent::Priced {
            sku: "sku-1".into(),
            cents: -1250,
            tags: vec!["a".into(), "bb".into()],
        },
        ShopEvent::Tagged(
            [("x".to_owned(), 7u16), ("y".to_owned(), 300)].into(),
            Some(Kind::Named { name: "n".into() }),
        ),
        ShopEvent::Tagged(BTreeMap::new(), Some(Kind::Sized(u32::MAX))),
        ShopEvent::Scored(1.5, true, 'é', u128::MAX / 3),
        ShopEvent::Upgraded {
            amount: 1 << 40,
            note: "now".into(),
        },
    ]
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Shop {
    name: String,
    prices: BTreeMap<String, i64>,
    events: u64,
    last: Option<Kind>,
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Shop {
    type Command = ShopEvent;
    type Event = ShopEvent;
    type Error = Never;
    const CATEGORY: &'static str = "shop";

    fn handle(&self, command: &ShopEvent) -> Result<Vec<ShopEvent>, Never> {
        Ok(vec![command.clone()])
    }

    fn apply(&mut self, event: &ShopEvent) {
        self.events += 1;
        match event {
            ShopEvent::Named(name) => self.name.clone_from(name),
            ShopEvent::Priced { sku, cents, .. } => {
                self.prices.insert(sku.clone(), *cents);
            }
            ShopEvent::Tagged(_, kind) => self.last.clone_from(kind),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------
// Payloads.

fn valid_payloads() -> Vec<(String, Vec<u8>)> {
    valid_events()
        .iter()
        .map(|e| {
            let encoded = encode_event(e).unwrap();
            (encoded.event_type, encoded.payload)
        })
        .collect()
}

fn event_type() -> impl Strategy<Value = String> {
    let known: Vec<String> = valid_payloads().into_iter().map(|(t, _)| t).collect();
    prop_oneof![
        4 => proptest::sample::select(known),
        1 => ".{0,20}",
    ]
}

#[test]
fn payload_decoders_never_panic() {
    let payloads: Vec<Vec<u8>> = valid_payloads().into_iter().map(|(_, p)| p).collect();
    let states: Vec<Vec<u8>> = [
        Shop::default(),
        Shop {
            name: "s".into(),
            prices: [("a".to_owned(), -3)].into(),
            events: 9,
            last: Some(Kind::Small),
        },
    ]
    .iter()
    .map(|s| encode_value(s).unwrap())
    .collect();
    let mut runner = proptest::test_runner::TestRunner::new(config());
    runner
        .run(
            &(
                event_type(),
                prop_oneof![Just(1u16), Just(2u16), any::<u16>()],
                input_from(payloads),
                input_from(states),
            ),
            |(event_type, schema_version, payload, state)| {
                // Any answer is fine; a panic fails the property.
                let _ = decode_event_parts::<ShopEvent>(&event_type, schema_version, &payload);
                let _ = decode_value::<Shop>(&state);
                let _ = decode_value::<ShopEvent>(&payload);
                let _ = decode_value::<(String, Vec<u64>, Option<char>)>(&payload);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn valid_payloads_decode_to_what_was_encoded() {
    for event in valid_events() {
        let encoded = encode_event(&event).unwrap();
        let decoded = decode_event_parts::<ShopEvent>(
            &encoded.event_type,
            encoded.schema_version,
            &encoded.payload,
        )
        .unwrap();
        assert_eq!(decoded, event);
    }
    // The upcaster path: a version-1 `Upgraded` is a bare u32.
    let old = encode_value(&41u32).unwrap();
    assert_eq!(
        decode_event_parts::<ShopEvent>("Upgraded", 1, &old).unwrap(),
        ShopEvent::Upgraded {
            amount: 41,
            note: String::new()
        }
    );
}

// ---------------------------------------------------------------------------
// Stored records, through the store's own reads.
//
// A store's trees can only be written behind its back while it is shut
// down (it lends no sled handle), so the cases are damaged in batches: one
// store holds `BATCH` blocks of the same small log (or `BATCH` aggregates),
// each block gets its own damaged record, and sled is opened once per batch
// instead of once per case.

/// Cases per opening of the store.
const BATCH: usize = 50;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The rounds of a batched property: `cases()` cases in batches of `BATCH`.
fn batched_config() -> ProptestConfig {
    ProptestConfig {
        cases: cases().div_ceil(BATCH as u32).max(1),
        ..config()
    }
}

/// Opens the store at `path`, which sled may hold for a few milliseconds
/// after the raw handle of the last round was dropped.
async fn open_store(path: &std::path::Path) -> SledStore {
    for _ in 0..1000 {
        match SledStore::open(path) {
            Ok(store) => return store,
            Err(annals::StoreError::InUse { .. }) => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await
            }
            Err(e) => panic!("open: {e}"),
        }
    }
    panic!("{} stayed locked", path.display())
}

/// Runs `write` on the trees of the shut-down store at `path`, through sled
/// itself, and closes sled again.
fn behind_its_back(path: &std::path::Path, write: impl FnOnce(&sled::Db)) {
    // `SledStore::shutdown` returns once the directory is free.
    let db = sled::Config::new().path(path).open().unwrap();
    write(&db);
    db.flush().unwrap();
}

/// A store with `BATCH` blocks of the same small log: in block `b`, one
/// event of every shape and full metadata on streams `shop-b-0..3`. Shut
/// down on return, with every event it holds.
fn filled_store(rt: &tokio::runtime::Runtime, path: &std::path::Path) -> Vec<RecordedEvent> {
    rt.block_on(async {
        let store = SledStore::open(path).unwrap();
        for block in 0..BATCH {
            for (i, event) in valid_events().iter().enumerate() {
                let mut new: NewEvent = encode_event(event).unwrap();
                let mut metadata = Metadata::new(Some(Uuid::now_v7()), Some(Uuid::now_v7()));
                metadata.extra.insert("k".into(), format!("v{i}"));
                new = new.with_metadata(metadata);
                let id = StreamId::new(format!("shop-{block}-{}", i % 3)).unwrap();
                store
                    .append(&id, ExpectedVersion::Any, vec![new])
                    .await
                    .unwrap();
            }
        }
        let log = store
            .read_all(
                Position::START,
                ReadDirection::Forward,
                usize::MAX,
                &EventFilter::All,
            )
            .await
            .unwrap();
        store.shutdown().await.unwrap();
        log
    })
}

/// Names a decoder may meet in a record that decodes: valid ones and every
/// kind the store refuses on input (empty, too long, control characters,
/// the reserved `$`).
fn stored_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("shop-0".to_owned()),
        Just(String::new()),
        Just("$all".to_owned()),
        Just("a\0b".to_owned()),
        Just("x".repeat(300)),
        ".{0,12}",
    ]
}

/// Records with the stored layout (docs/design.md) and arbitrary field
/// values: they decode, and carry what the store never writes.
fn structured_record() -> impl Strategy<Value = Vec<u8>> {
    (
        (
            any::<u128>(),
            stored_name(),
            any::<u64>(),
            stored_name(),
            any::<u16>(),
        ),
        (
            any::<u64>(),
            any::<Option<u128>>(),
            any::<Option<u128>>(),
            proptest::collection::vec((stored_name(), stored_name()), 0..3),
            proptest::collection::vec(any::<u8>(), 0..40),
        ),
    )
        .prop_map(
            |((id, stream, version, event_type, schema), (at, corr, cause, extra, payload))| {
                postcard::to_stdvec(&(
                    Uuid::from_u128(id),
                    stream,
                    version,
                    event_type,
                    schema,
                    at,
                    corr.map(Uuid::from_u128),
                    cause.map(Uuid::from_u128),
                    extra,
                    payload,
                ))
                .unwrap()
            },
        )
}

#[test]
fn damaged_event_records_are_typed_errors() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let log = filled_store(&rt, &path);
    let mut originals: Vec<Vec<u8>> = Vec::new();
    behind_its_back(&path, |db| {
        let tree = db.open_tree("log").unwrap();
        originals = stored_records(&tree);
        assert_eq!(originals.len(), log.len());
    });
    // Events per block.
    let n = (log.len() / BATCH) as u64;

    // The structured records follow the stored layout: the first event,
    // re-encoded field by field, is byte for byte what the store wrote.
    let first = &log[0];
    let relaid = postcard::to_stdvec(&(
        first.event_id,
        first.stream_id.as_str(),
        first.version.0,
        first.event_type.as_str(),
        first.schema_version,
        first.recorded_at_micros,
        first.metadata.correlation_id,
        first.metadata.causation_id,
        first.metadata.extra.iter().collect::<Vec<_>>(),
        first.payload.clone(),
    ))
    .unwrap();
    assert_eq!(relaid, originals[0], "docs/design.md's record layout");

    // A case: a position in a block and the bytes written there.
    let case = (
        1..=n,
        prop_oneof![3 => input_from(originals.clone()), 1 => structured_record()],
    );
    let mut runner = proptest::test_runner::TestRunner::new(batched_config());
    runner
        .run(
            &proptest::collection::vec(case, BATCH),
            |cases: Vec<(u64, Vec<u8>)>| {
                // Block `b` is damaged at log position `b * n + p`.
                let damaged: Vec<u64> = cases
                    .iter()
                    .enumerate()
                    .map(|(block, (p, _))| block as u64 * n + p)
                    .collect();
                behind_its_back(&path, |db| {
                    let tree = db.open_tree("log").unwrap();
                    // One record to a chunk, so that each damaged record
                    // is alone in its chunk.
                    for (index, original) in originals.iter().enumerate() {
                        tree.insert(chunk_key(index as u64 + 1), single_chunk(original))
                            .unwrap();
                    }
                    for (position, (_, bytes)) in damaged.iter().zip(&cases) {
                        tree.insert(chunk_key(*position), single_chunk(bytes))
                            .unwrap();
                    }
                });
                rt.block_on(async {
                    let store = open_store(&path).await;
                    let all = store
                        .read_all(
                            Position::START,
                            ReadDirection::Forward,
                            usize::MAX,
                            &EventFilter::All,
                        )
                        .await;
                    if let Ok(events) = &all {
                        // Decoded: the other events are untouched.
                        for (read, original) in events.iter().zip(&log) {
                            if !damaged.contains(&read.position.0) {
                                prop_assert_eq!(read, original);
                            }
                        }
                    }
                    let _ = store
                        .read_all(
                            Position::END,
                            ReadDirection::Backward,
                            3,
                            &EventFilter::Category("shop".into()),
                        )
                        .await;
                    for (block, &position) in damaged.iter().enumerate() {
                        let base = block as u64 * n;
                        for i in 0..3 {
                            let id = StreamId::new(format!("shop-{block}-{i}")).unwrap();
                            let _ = store
                                .read_stream(
                                    &id,
                                    Version::FIRST,
                                    ReadDirection::Forward,
                                    usize::MAX,
                                )
                                .await;
                        }
                        // The neighbours in its block, read alone, are
                        // exactly as written.
                        if position > base + 1 {
                            let before = store
                                .read_all(
                                    Position(base + 1),
                                    ReadDirection::Forward,
                                    (position - base - 1) as usize,
                                    &EventFilter::All,
                                )
                                .await
                                .unwrap();
                            prop_assert_eq!(
                                &before[..],
                                &log[base as usize..position as usize - 1]
                            );
                        }
                        if position < base + n {
                            let after = store
                                .read_all(
                                    Position(position + 1),
                                    ReadDirection::Forward,
                                    (base + n - position) as usize,
                                    &EventFilter::All,
                                )
                                .await
                                .unwrap();
                            prop_assert_eq!(
                                &after[..],
                                &log[position as usize..(base + n) as usize]
                            );
                        }
                        // A retry of a stored event looks its record up by id.
                        let original = &log[position as usize - 1];
                        let retry =
                            NewEvent::new(original.event_type.clone(), original.payload.clone())
                                .with_id(original.event_id);
                        let _ = store
                            .append(&original.stream_id, ExpectedVersion::Any, vec![retry])
                            .await;
                    }
                    store.shutdown().await.unwrap();
                    Ok(())
                })?;
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn damaged_snapshots_never_panic_and_recovery_still_works() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let runtime_config = RuntimeConfig::builder().snapshot_every(0).build().unwrap();
    let ids: Vec<String> = (1..=BATCH).map(|b| b.to_string()).collect();
    // Every aggregate of the batch has the same events; three of them
    // get a valid snapshot, at versions 0, 3 and 7.
    let expected = rt.block_on(async {
        let store = Arc::new(SledStore::open(&path).unwrap());
        let aggregates = Runtime::new(store.clone(), runtime_config.clone());
        let shops = aggregates.aggregates::<Shop>();
        for id in &ids {
            for event in valid_events() {
                shops.execute(id, event).await.unwrap();
            }
        }
        let expected = shops.state("1").await.unwrap();
        let valid_state = encode_value(&expected).unwrap();
        for (id, version) in ids.iter().zip([0u64, 3, 7]) {
            store
                .save_snapshot(
                    &StreamId::new(format!("shop-{id}")).unwrap(),
                    Snapshot {
                        version: Version(version),
                        payload: valid_state.clone(),
                    },
                )
                .await
                .unwrap();
        }
        aggregates.shutdown().await.unwrap();
        expected
    });
    let mut valid_records = Vec::new();
    behind_its_back(&path, |db| {
        let snapshots = db.open_tree("snapshots").unwrap();
        for id in &ids[..3] {
            let record = snapshots.get(format!("shop-{id}")).unwrap().unwrap();
            valid_records.push(record.to_vec());
        }
    });

    let mut runner = proptest::test_runner::TestRunner::new(batched_config());
    runner
        .run(
            &proptest::collection::vec(input_from(valid_records), BATCH),
            |records: Vec<Vec<u8>>| {
                behind_its_back(&path, |db| {
                    let snapshots = db.open_tree("snapshots").unwrap();
                    for (id, bytes) in ids.iter().zip(records) {
                        snapshots.insert(format!("shop-{id}"), bytes).unwrap();
                    }
                });
                rt.block_on(async {
                    let store = Arc::new(open_store(&path).await);
                    let aggregates = Runtime::new(store.clone(), runtime_config.clone());
                    let shops = aggregates.aggregates::<Shop>();
                    for id in &ids {
                        let stream = StreamId::new(format!("shop-{id}")).unwrap();
                        let _ = store.load_snapshot(&stream).await;
                        // Recovery (of a version in the past, read-only)
                        // meets the damaged snapshot: a state or a typed
                        // error, never a panic.
                        match shops.state_at(id, Version(7)).await {
                            Ok(_) | Err(QueryError::Codec(_) | QueryError::Store(_)) => {}
                            Err(other) => prop_assert!(false, "unexpected error {other}"),
                        }
                    }
                    aggregates.shutdown().await.unwrap();
                    Ok(())
                })?;
                Ok(())
            },
        )
        .unwrap();

    // With the snapshots gone the state is the full replay again (I5).
    behind_its_back(&path, |db| {
        db.open_tree("snapshots").unwrap().clear().unwrap();
    });
    rt.block_on(async {
        let store = Arc::new(open_store(&path).await);
        let aggregates = Runtime::new(store, runtime_config);
        let shops = aggregates.aggregates::<Shop>();
        for id in &ids {
            assert_eq!(shops.state_at(id, Version(7)).await.unwrap(), expected);
        }
        let late: Result<_, CommandError<Never>> = shops.execute("1", ShopEvent::Opened).await;
        late.unwrap();
        aggregates.shutdown().await.unwrap();
    });
}

// ---------------------------------------------------------------------------
// Renamed event types, end to end through the runtime on a MemoryStore.

/// Release 2 of a library's loans: release 1 stored `LoanStarted { member }`
/// and `LoanEnded`; release 2 renamed them `BookLent` and `BookReturned`,
/// and `BookLent` gained a due day (schema version 2, upcast from the
/// version line `LoanStarted` began).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum LoanEvent {
    BookLent { member: String, due_day: u32 },
    BookReturned,
}

impl DomainEvent for LoanEvent {
    fn schema_version(event_type: &str) -> u16 {
        if event_type == "BookLent" {
            2
        } else {
            1
        }
    }

    fn upcasters(upcasters: &mut Upcasters) {
        upcasters
            .rename("LoanStarted", "BookLent")
            .rename("LoanEnded", "BookReturned")
            .add("BookLent", 1, |(member,): (String,)| (member, 14u32));
    }
}

#[derive(Debug)]
enum LoanCommand {
    Lend(String),
    Return,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Book {
    borrower: Option<String>,
    due_day: u32,
    loans: u32,
}

impl Aggregate for Book {
    type Command = LoanCommand;
    type Event = LoanEvent;
    type Error = Never;
    const CATEGORY: &'static str = "book";

    fn handle(&self, command: &LoanCommand) -> Result<Vec<LoanEvent>, Never> {
        Ok(vec![match command {
            LoanCommand::Lend(member) => LoanEvent::BookLent {
                member: member.clone(),
                due_day: 7,
            },
            LoanCommand::Return => LoanEvent::BookReturned,
        }])
    }

    fn apply(&mut self, event: &LoanEvent) {
        match event {
            LoanEvent::BookLent { member, due_day } => {
                self.borrower = Some(member.clone());
                self.due_day = *due_day;
                self.loans += 1;
            }
            LoanEvent::BookReturned => self.borrower = None,
        }
    }
}

/// Appends release-1 records (old names, schema version 1) to `stream`.
async fn store_release_one(store: &MemoryStore, stream: &str, members: &[&str]) {
    let stream = StreamId::new(stream).unwrap();
    let mut events = Vec::new();
    for member in members {
        events.push(NewEvent::new(
            "LoanStarted",
            encode_value(&(member.to_string(),)).unwrap(),
        ));
        events.push(NewEvent::new("LoanEnded", Vec::new()));
    }
    events.pop(); // the last loan is still running
    store
        .append(&stream, ExpectedVersion::NoStream, events)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_aggregate_recovers_events_stored_under_renamed_types() {
    let store = Arc::new(MemoryStore::new());
    store_release_one(&store, "book-1", &["ada", "bob"]).await;
    let runtime = Runtime::new(store.clone(), RuntimeConfig::default());
    let books = runtime.aggregates::<Book>();
    assert_eq!(
        books.state("1").await.unwrap(),
        Book {
            borrower: Some("bob".into()),
            due_day: 14,
            loans: 2
        }
    );

    books.execute("1", LoanCommand::Return).await.unwrap();
    books
        .execute("1", LoanCommand::Lend("cy".into()))
        .await
        .unwrap();
    let stream = StreamId::new("book-1").unwrap();
    let stored: Vec<(String, u16)> = store
        .read_stream(&stream, Version::FIRST, ReadDirection::Forward, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.event_type, e.schema_version))
        .collect();
    // The old records are untouched; new ones carry the current names.
    let expected = [
        ("LoanStarted", 1),
        ("LoanEnded", 1),
        ("LoanStarted", 1),
        ("BookReturned", 1),
        ("BookLent", 2),
    ];
    let expected: Vec<(String, u16)> = expected.iter().map(|(t, v)| (t.to_string(), *v)).collect();
    assert_eq!(stored, expected);

    // A second runtime (its shutdown would close the shared store) replays
    // the mixed stream to the same state.
    let replayed = Runtime::new(
        store,
        RuntimeConfig::builder().snapshot_every(0).build().unwrap(),
    );
    let state = replayed.aggregates::<Book>().state("1").await.unwrap();
    assert_eq!(
        state,
        Book {
            borrower: Some("cy".into()),
            due_day: 7,
            loans: 3
        }
    );
    runtime.shutdown().await.unwrap();
    replayed.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unknown_event_type_names_its_stream_and_version() {
    let store = Arc::new(MemoryStore::new());
    store_release_one(&store, "book-2", &["ada"]).await;
    let stream = StreamId::new("book-2").unwrap();
    store
        .append(
            &stream,
            ExpectedVersion::Exact(Version(1)),
            vec![NewEvent::new("BookLost", Vec::new())],
        )
        .await
        .unwrap();
    let runtime = Runtime::new(store, RuntimeConfig::default());
    let books = runtime.aggregates::<Book>();
    let error = books.execute("2", LoanCommand::Return).await.unwrap_err();
    match &error {
        CommandError::Codec(CodecError::UnknownEventType {
            stream_id,
            version,
            event_type,
        }) => {
            assert_eq!(stream_id.as_str(), "book-2");
            assert_eq!(*version, Version(2));
            assert_eq!(event_type, "BookLost");
        }
        other => panic!("expected UnknownEventType, got {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains("book-2") && message.contains("version 2"),
        "{message}"
    );
    match books.state("2").await {
        Err(QueryError::Codec(CodecError::UnknownEventType { version, .. })) => {
            assert_eq!(version, Version(2))
        }
        other => panic!("expected UnknownEventType, got {other:?}"),
    }
    // Bare parts have no stream: the name-only variant.
    assert!(matches!(
        decode_event_parts::<LoanEvent>("BookLost", 1, &[]),
        Err(CodecError::UnknownEventTypeName { event_type }) if event_type == "BookLost"
    ));
    runtime.shutdown().await.unwrap();
}

#[test]
fn renamed_types_are_upcast_along_the_current_name_line() {
    let v1 = encode_value(&("ada".to_owned(),)).unwrap();
    let lent = LoanEvent::BookLent {
        member: "ada".into(),
        due_day: 14,
    };
    // An old name at version 1, and the current name at version 1 (written
    // by a release between the rename and the new field): both upcast.
    assert_eq!(
        decode_event_parts::<LoanEvent>("LoanStarted", 1, &v1).unwrap(),
        lent
    );
    assert_eq!(
        decode_event_parts::<LoanEvent>("BookLent", 1, &v1).unwrap(),
        lent
    );
    // An old name at the current version decodes as is.
    let v2 = encode_event(&lent).unwrap().payload;
    assert_eq!(
        decode_event_parts::<LoanEvent>("LoanStarted", 2, &v2).unwrap(),
        lent
    );
    // A version beyond the current one has no path, under either name.
    for name in ["LoanStarted", "BookLent"] {
        assert!(matches!(
            decode_event_parts::<LoanEvent>(name, 3, &v2),
            Err(CodecError::NoUpcaster { event_type, found: 3, current: 2 }) if event_type == "BookLent"
        ));
    }
}
