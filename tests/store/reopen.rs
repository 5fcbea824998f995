//! Reopening the sled store: everything written comes back byte for byte,
//! after `shutdown()` and after a plain drop, in every durability mode;
//! positions and versions continue with no gap and no reuse; and paths that
//! do not hold a store of this format are typed errors.

use crate::common;

use std::path::Path;
use std::sync::Arc;

use annals::store::{
    AppendError, AppendResult, Durability, EventFilter, Metadata, ReadDirection, SledStoreConfig,
    Snapshot, FORMAT_VERSION,
};
use annals::{
    EventStore, ExpectedVersion, NewEvent, Position, RecordedEvent, SledStore, StoreError,
    StreamId, Version,
};
use common::child;
use common::{until_unlocked, whole_log, whole_stream};
use tokio::sync::Barrier;
use uuid::Uuid;

fn stream(id: &str) -> StreamId {
    StreamId::new(id).expect("valid stream id")
}

fn open(path: &Path, durability: Durability) -> SledStore {
    let config = SledStoreConfig::new(path).durability(durability);
    until_unlocked(|| SledStore::open_with(config.clone()))
        .unwrap_or_else(|e| panic!("open {} with {durability:?}: {e}", path.display()))
}

/// How the first store goes away before the path is reopened.
#[derive(Clone, Copy, Debug)]
enum Close {
    Shutdown,
    Drop,
}

/// What a first session wrote, to compare after reopening.
struct Written {
    log: Vec<RecordedEvent>,
    streams: Vec<(StreamId, Vec<RecordedEvent>)>,
    retry: (StreamId, Vec<NewEvent>, AppendResult),
}

/// Writes several streams with metadata, multi-event appends, a large
/// payload, a snapshot and a checkpoint.
async fn write_session(store: &SledStore) -> Written {
    let order_1 = stream("order-1");
    let order_2 = stream("order-2");
    let customer = stream("customer-7");
    let mut extra = std::collections::BTreeMap::new();
    extra.insert("tenant".to_owned(), "acme".to_owned());
    let tagged = NewEvent::new("OrderPlaced", vec![1, 2, 3, 0, 255])
        .with_schema_version(2)
        .with_metadata(Metadata {
            correlation_id: Some(Uuid::now_v7()),
            causation_id: Some(Uuid::now_v7()),
            extra,
        });
    let retried = vec![
        NewEvent::new("LineAdded", b"sku-1".to_vec()),
        NewEvent::new("LineAdded", b"sku-2".to_vec()),
    ];
    // Large enough that sled keeps it outside its log pages.
    let large = NewEvent::new("Imported", vec![0x5A; 200_000]);

    store
        .append(&order_1, ExpectedVersion::NoStream, vec![tagged])
        .await
        .unwrap();
    let retry_result = store
        .append(
            &order_1,
            ExpectedVersion::Exact(Version(1)),
            retried.clone(),
        )
        .await
        .unwrap();
    store
        .append(&customer, ExpectedVersion::NoStream, vec![large])
        .await
        .unwrap();
    for i in 0..5 {
        let event = NewEvent::new("Noted", format!("note {i}").into_bytes());
        store
            .append(&order_2, ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
    }
    store
        .save_snapshot(
            &order_1,
            Snapshot {
                version: Version(3),
                payload: b"three lines".to_vec(),
            },
        )
        .await
        .unwrap();
    store
        .save_checkpoint("orders-view", Position(6))
        .await
        .unwrap();

    let log = whole_log(store).await;
    assert_eq!(log.len(), 9);
    let mut streams = Vec::new();
    for id in [order_1.clone(), order_2, customer] {
        let events = whole_stream(store, &id).await;
        streams.push((id, events));
    }
    Written {
        log,
        streams,
        retry: (order_1, retried, retry_result),
    }
}

/// Reads everything back after reopening and checks that the log goes on
/// where it stopped.
async fn check_reopened(store: &SledStore, written: &Written) {
    let head = Position(written.log.len() as u64);
    // Restored from the stored head, before any read.
    assert_eq!(store.head_position(), head);
    assert_eq!(
        whole_log(store).await,
        written.log,
        "$all changed across reopen"
    );
    for (id, events) in &written.streams {
        assert_eq!(&whole_stream(store, id).await, events, "{id} changed");
        assert_eq!(
            store.stream_version(id).await.unwrap(),
            Version(events.len() as u64)
        );
    }
    let backward = store
        .read_all(Position::END, ReadDirection::Backward, 3, &EventFilter::All)
        .await
        .unwrap();
    assert_eq!(
        backward.iter().map(|e| e.position).collect::<Vec<_>>(),
        [head, Position(head.0 - 1), Position(head.0 - 2)]
    );
    assert_eq!(
        store.load_snapshot(&stream("order-1")).await.unwrap(),
        Some(Snapshot {
            version: Version(3),
            payload: b"three lines".to_vec(),
        })
    );
    assert_eq!(
        store.load_checkpoint("orders-view").await.unwrap(),
        Some(Position(6))
    );

    // A request retried across the restart is still recognised.
    let (id, events, original) = &written.retry;
    let retried = store
        .append(id, ExpectedVersion::Exact(Version(1)), events.clone())
        .await
        .unwrap();
    assert_eq!(retried, *original);
    assert_eq!(store.head_position(), head);

    // Versions and positions go on with no gap and no reuse.
    let order_1 = stream("order-1");
    let next = store
        .append(
            &order_1,
            ExpectedVersion::Exact(Version(3)),
            vec![NewEvent::new("OrderShipped", Vec::new())],
        )
        .await
        .unwrap();
    assert_eq!(
        (next.first_version, next.first_position),
        (Version(4), head.next())
    );
    let fresh = store
        .append(
            &stream("order-3"),
            ExpectedVersion::NoStream,
            vec![
                NewEvent::new("OrderPlaced", Vec::new()),
                NewEvent::new("OrderPaid", Vec::new()),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        fresh,
        AppendResult {
            first_version: Version(1),
            last_version: Version(2),
            first_position: Position(head.0 + 2),
            last_position: Position(head.0 + 3),
        }
    );
    let conflict = store
        .append(
            &order_1,
            ExpectedVersion::Exact(Version(3)),
            vec![NewEvent::new("Late", Vec::new())],
        )
        .await;
    assert!(conflict.is_err(), "the stored head of order-1 was not used");
}

/// Write, close one way, reopen at once, check, close, and reopen again to
/// check that the second session's appends were kept too.
async fn round_trip(durability: Durability, close: Close) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");

    let store = open(&path, durability);
    let written = write_session(&store).await;
    if let Close::Shutdown = close {
        store.shutdown().await.unwrap();
    }
    drop(store);

    let store = open(&path, durability);
    check_reopened(&store, &written).await;
    let log = whole_log(&store).await;
    assert_eq!(log.len(), written.log.len() + 3);
    if let Close::Shutdown = close {
        store.shutdown().await.unwrap();
    }
    drop(store);

    let store = open(&path, durability);
    assert_eq!(whole_log(&store).await, log);
    assert_eq!(store.head_position(), Position(log.len() as u64));
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn fsync_survives_shutdown() {
    round_trip(Durability::Fsync, Close::Shutdown).await;
}

#[tokio::test]
async fn fsync_survives_drop() {
    round_trip(Durability::Fsync, Close::Drop).await;
}

#[tokio::test]
async fn flush_survives_shutdown() {
    round_trip(Durability::Flush, Close::Shutdown).await;
}

#[tokio::test]
async fn flush_survives_drop() {
    round_trip(Durability::Flush, Close::Drop).await;
}

// A flush period far longer than the test: only the final flush on
// shutdown or drop can have made the appends durable.
#[tokio::test]
async fn buffered_survives_shutdown() {
    round_trip(
        Durability::Buffered {
            flush_every_ms: 600_000,
        },
        Close::Shutdown,
    )
    .await;
}

#[tokio::test]
async fn buffered_survives_drop() {
    round_trip(
        Durability::Buffered {
            flush_every_ms: 600_000,
        },
        Close::Drop,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_right_after_acknowledgement_loses_nothing() {
    // Many rounds, because the window between an acknowledgement and the
    // writer's final flush is short.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let id = stream("dropped-1");
    for round in 1..=20u64 {
        let store = open(&path, Durability::Flush);
        let appended = store
            .append(
                &id,
                ExpectedVersion::Exact(Version(round - 1)),
                vec![NewEvent::new("Counted", round.to_be_bytes().to_vec())],
            )
            .await
            .unwrap();
        assert_eq!(appended.last_position, Position(round));
        drop(store);
    }
    let store = open(&path, Durability::Flush);
    let events = whole_stream(&store, &id).await;
    assert_eq!(
        events.iter().map(|e| e.payload.clone()).collect::<Vec<_>>(),
        (1..=20u64)
            .map(|i| i.to_be_bytes().to_vec())
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_regular_file_is_not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, b"not a store").unwrap();
    assert!(matches!(
        SledStore::open(&file),
        Err(StoreError::NotAStore(_))
    ));
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"not a store",
        "the file was altered"
    );
}

#[tokio::test]
async fn a_directory_of_other_files_is_not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("readme.md"), b"hello").unwrap();
    std::fs::create_dir(dir.path().join("photos")).unwrap();
    assert!(matches!(
        SledStore::open(dir.path()),
        Err(StoreError::NotAStore(_))
    ));
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["photos", "readme.md"], "the directory was altered");
}

#[tokio::test]
async fn another_sled_database_is_not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.insert(b"user-key", b"user-value").unwrap();
        db.flush().unwrap();
    }
    assert!(matches!(
        until_unlocked(|| SledStore::open(dir.path())),
        Err(StoreError::NotAStore(_))
    ));
    let db = until_unlocked(|| sled::open(dir.path())).unwrap();
    assert_eq!(
        db.get(b"user-key").unwrap().as_deref(),
        Some(&b"user-value"[..])
    );
}

#[tokio::test]
async fn another_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = SledStore::open(&path).unwrap();
    store
        .append(
            &stream("order-1"),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("OrderPlaced", Vec::new())],
        )
        .await
        .unwrap();
    store.shutdown().await.unwrap();
    drop(store);

    let future = FORMAT_VERSION + 1;
    {
        let db = until_unlocked(|| sled::open(&path)).unwrap();
        let log = db.open_tree("log").unwrap();
        log.insert(b"Mformat", &future.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    match until_unlocked(|| SledStore::open(&path)) {
        Err(StoreError::FormatMismatch { found, expected }) => {
            assert_eq!((found, expected), (future, FORMAT_VERSION));
        }
        other => panic!("expected FormatMismatch, got {other:?}"),
    }
}

/// A second open of a directory in use is a typed error naming the path,
/// not a panic, and leaves the first store working.
#[tokio::test]
async fn a_store_open_twice_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let first = SledStore::open(&path).unwrap();
    match SledStore::open(&path) {
        Err(error @ StoreError::InUse { .. }) => {
            let message = error.to_string();
            let StoreError::InUse { path: reported } = error else {
                unreachable!()
            };
            assert_eq!(reported, path);
            assert!(
                message.contains(&path.display().to_string()) && message.contains("in use"),
                "the message does not name the path: {message}"
            );
        }
        other => panic!("expected InUse, got {other:?}"),
    }
    first
        .append(
            &stream("order-1"),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("OrderPlaced", Vec::new())],
        )
        .await
        .expect("the first store still works");
    first.shutdown().await.unwrap();
}

/// A holder that lets go of the directory shortly after the open starts
/// (as sled does a few milliseconds after its last handle is dropped, or
/// a service that is stopping) is waited for: the open succeeds instead of
/// reporting `InUse`.
#[tokio::test]
async fn an_open_waits_for_a_holder_that_is_letting_go() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    SledStore::open(&path).unwrap().shutdown().await.unwrap();
    let holder = sled::open(&path).unwrap();
    let letting_go = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(holder);
    });
    let store = SledStore::open(&path).expect("the open waits for the lock to be released");
    letting_go.join().unwrap();
    store.shutdown().await.unwrap();
}

/// Set in the child process of `a_store_open_in_another_process_is_in_use`.
const CHILD_HOLDER: &str = "ANNALS_TEST_CHILD_HOLDER";

/// Another process holding the store makes an open fail with `InUse`; once
/// it exits, the open works.
#[tokio::test]
async fn a_store_open_in_another_process_is_in_use() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::Stdio;

    if let Ok(path) = std::env::var(CHILD_HOLDER) {
        let store = SledStore::open(&path).unwrap();
        // Tell the parent, then hold the store until stdin closes.
        println!("holding");
        std::io::stdout().flush().unwrap();
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        store.shutdown().await.unwrap();
        std::process::exit(0);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let mut child = child::test(module_path!(), "a_store_open_in_another_process_is_in_use")
        .env(CHILD_HOLDER, &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // libtest may print `test <name> ... ` before it on the same line.
    let held = lines.any(|line| line.is_ok_and(|line| line.ends_with("holding")));
    assert!(held, "the child never opened the store");
    match SledStore::open(&path) {
        Err(StoreError::InUse { path: reported }) => assert_eq!(reported, path),
        other => panic!("expected InUse while the child holds the store, got {other:?}"),
    }
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    let store = SledStore::open(&path).expect("free once the child exited");
    store.shutdown().await.unwrap();
}

/// `shutdown()` returning means the directory is free: it reopens at once
/// in the same process while the first handle is still alive, in every
/// durability mode, and the reopened store has the event. The first handle
/// then refuses reads with `Closed` instead of reading a store it no
/// longer holds.
#[tokio::test]
async fn shutdown_frees_the_directory_while_the_handle_lives() {
    let modes = [
        Durability::Fsync,
        Durability::Flush,
        Durability::Buffered { flush_every_ms: 50 },
    ];
    for durability in modes {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let config = SledStoreConfig::new(&path).durability(durability);
        let first = SledStore::open_with(config.clone()).unwrap();
        let id = stream("order-1");
        first
            .append(
                &id,
                ExpectedVersion::NoStream,
                vec![NewEvent::new("OrderPlaced", b"first".to_vec())],
            )
            .await
            .unwrap();
        first.save_checkpoint("view", Position(1)).await.unwrap();
        first.shutdown().await.unwrap();

        // The lock itself, asked the way sled takes it: an open waits for
        // a lock being released, so only this shows it is free *now*.
        let db_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path.join("db"))
            .unwrap();
        assert!(
            fs4::FileExt::try_lock(&db_file).is_ok(),
            "{durability:?}: sled's lock is still held after shutdown returned"
        );
        drop(db_file);
        let second = SledStore::open_with(config)
            .unwrap_or_else(|e| panic!("{durability:?}: reopen after shutdown: {e}"));
        let events = whole_stream(&second, &id).await;
        assert_eq!(events.len(), 1, "{durability:?}");
        assert_eq!(events[0].payload, b"first", "{durability:?}");
        assert_eq!(
            second.load_checkpoint("view").await.unwrap(),
            Some(Position(1))
        );
        match first.stream_version(&id).await {
            Err(annals::store::ReadError::Store(StoreError::Closed)) => {}
            other => panic!("{durability:?}: expected Closed from the old handle, got {other:?}"),
        }
        match first.load_checkpoint("view").await {
            Err(annals::store::ReadError::Store(StoreError::Closed)) => {}
            other => panic!("{durability:?}: expected Closed from the old handle, got {other:?}"),
        }
        second.shutdown().await.unwrap();
        drop(first);
        drop(second);
    }
}

/// Set in the child process of `drop_then_exit_loses_nothing`.
const CHILD_STORE: &str = "ANNALS_TEST_CHILD_STORE";
const CHILD_EVENTS: u64 = 50;

/// A program that drops its store and exits at once, without `shutdown()`,
/// must not lose an acknowledged append, even in `Buffered` mode where only
/// the final flush makes it durable. The child process does exactly that.
#[tokio::test]
async fn drop_then_exit_loses_nothing() {
    let buffered = Durability::Buffered {
        flush_every_ms: 600_000,
    };
    if let Ok(path) = std::env::var(CHILD_STORE) {
        let store = open(Path::new(&path), buffered);
        let id = stream("exiting-1");
        for i in 0..CHILD_EVENTS {
            store
                .append(
                    &id,
                    ExpectedVersion::Exact(Version(i)),
                    vec![NewEvent::new("Counted", i.to_be_bytes().to_vec())],
                )
                .await
                .unwrap();
        }
        drop(store);
        std::process::exit(0);
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    for round in 0..3 {
        let status = child::test(module_path!(), "drop_then_exit_loses_nothing")
            .env(CHILD_STORE, &path)
            .status()
            .unwrap();
        assert!(status.success(), "child failed: {status}");
        let store = open(&path, buffered);
        let events = whole_stream(&store, &stream("exiting-1")).await;
        assert_eq!(
            events.len() as u64,
            CHILD_EVENTS,
            "round {round}: acknowledged appends were lost when the child exited after drop"
        );
        assert_eq!(store.head_position(), Position(CHILD_EVENTS));
        store.shutdown().await.unwrap();
        drop(store);
        std::fs::remove_dir_all(&path).unwrap();
    }
}

/// The sled writer keeps stream heads in a bounded cache and falls back to
/// the index on a miss. With a cache too small for the streams in use (so
/// it is emptied and refilled all the time), with none, and with room for
/// all, optimistic appends from many tasks must still be decided against
/// the true head: every stream ends at versions 1..n with n equal to the
/// appends acknowledged on it, before and after a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_versions_hold_whatever_the_head_cache_holds() {
    const STREAMS: usize = 7;
    const TASKS: usize = 48;
    const ATTEMPTS: usize = 40;
    for capacity in [0, 1, 3, 1_000] {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("store");
        let config = SledStoreConfig::new(&path).head_cache_capacity(capacity);
        let store = Arc::new(SledStore::open_with(config.clone()).expect("open"));
        let streams: Vec<StreamId> = (0..STREAMS)
            .map(|n| StreamId::new(format!("cache-{n}")).unwrap())
            .collect();
        let barrier = Arc::new(Barrier::new(TASKS));
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let (store, streams, barrier) = (store.clone(), streams.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let mut won = vec![0u64; STREAMS];
                for attempt in 0..ATTEMPTS {
                    let which = (task * 31 + attempt * 7) % STREAMS;
                    let stream = &streams[which];
                    let seen = store.stream_version(stream).await.unwrap();
                    let event = NewEvent::new("Tried", vec![task as u8]);
                    match store
                        .append(stream, ExpectedVersion::Exact(seen), vec![event])
                        .await
                    {
                        Ok(result) => {
                            assert_eq!(result.first_version, Version(seen.0 + 1));
                            won[which] += 1;
                        }
                        Err(AppendError::WrongExpectedVersion { actual, .. }) => {
                            assert!(actual > seen, "refused at {seen:?}, head {actual:?}");
                        }
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                }
                won
            }));
        }
        let mut won = vec![0u64; STREAMS];
        for task in tasks {
            for (total, mine) in won.iter_mut().zip(task.await.unwrap()) {
                *total += mine;
            }
        }
        let check = |store: Arc<dyn EventStore>, won: Vec<u64>, streams: Vec<StreamId>| async move {
            for (stream, &count) in streams.iter().zip(&won) {
                assert!(count > 0, "capacity {capacity}: no append won on {stream}");
                assert_eq!(store.stream_version(stream).await.unwrap(), Version(count));
                let versions: Vec<u64> = store
                    .read_stream(stream, Version(1), ReadDirection::Forward, usize::MAX)
                    .await
                    .unwrap()
                    .iter()
                    .map(|event| event.version.0)
                    .collect();
                assert_eq!(
                    versions,
                    (1..=count).collect::<Vec<_>>(),
                    "capacity {capacity}"
                );
                // The next append is decided against the head too.
                let stale = store
                    .append(
                        stream,
                        ExpectedVersion::Exact(Version(count - 1)),
                        vec![NewEvent::new("Stale", vec![])],
                    )
                    .await;
                assert!(
                    matches!(stale, Err(AppendError::WrongExpectedVersion { .. })),
                    "capacity {capacity}: a stale expected version was not refused"
                );
            }
        };
        check(store.clone(), won.clone(), streams.clone()).await;
        store.shutdown().await.expect("shutdown");
        drop(store);
        let reopened: Arc<dyn EventStore> =
            Arc::new(until_unlocked(|| SledStore::open_with(config.clone())).expect("reopen"));
        check(reopened, won, streams).await;
    }
}
