//! The stream index of format 4, written off the commit path: a stream's
//! newest entries live in memory until the indexer thread writes them as
//! blocks. These tests flush every few events, so that reads meet every
//! state: entries in blocks, in the tail, in a flush under way, and after
//! an open that rebuilds the tail (a crash before, or part-way through, a
//! flush).

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use annals::store::{EventFilter, ReadDirection, SledStoreConfig};
use annals::{
    EventStore, ExpectedVersion, NewEvent, Position, RecordedEvent, SledStore, StreamId, Version,
};
use common::{until_unlocked, whole_log};

const STREAMS: usize = 48;

fn config(path: &Path, flush_every: usize) -> SledStoreConfig {
    SledStoreConfig::new(path).stream_index_flush_events(flush_every)
}

fn open(path: &Path, flush_every: usize) -> SledStore {
    until_unlocked(|| SledStore::open_with(config(path, flush_every))).expect("open")
}

fn stream(n: usize) -> StreamId {
    StreamId::new(format!("order-{n}")).unwrap()
}

/// Every stream, read forward, backward, from the middle and through
/// `$all`'s stream filter, must be exactly its events of `log`.
async fn check_streams(store: &SledStore, log: &[RecordedEvent]) {
    let mut expected: BTreeMap<StreamId, Vec<RecordedEvent>> = BTreeMap::new();
    for event in log {
        expected
            .entry(event.stream_id.clone())
            .or_default()
            .push(event.clone());
    }
    for (id, events) in &expected {
        let versions: Vec<u64> = events.iter().map(|e| e.version.0).collect();
        let count = events.len() as u64;
        assert_eq!(versions, (1..=count).collect::<Vec<_>>(), "{id} in $all");
        let forward = common::whole_stream(store, id).await;
        assert_eq!(&forward, events, "{id} forward");
        let mut backward = store
            .read_stream(id, Version::MAX, ReadDirection::Backward, usize::MAX)
            .await
            .unwrap();
        backward.reverse();
        assert_eq!(&backward, events, "{id} backward");
        let middle = count / 2 + 1;
        let from_middle = store
            .read_stream(id, Version(middle), ReadDirection::Forward, 3)
            .await
            .unwrap();
        let want: Vec<_> = events
            .iter()
            .skip(middle as usize - 1)
            .take(3)
            .cloned()
            .collect();
        assert_eq!(from_middle, want, "{id} forward from {middle}");
        let down = store
            .read_stream(id, Version(middle), ReadDirection::Backward, 3)
            .await
            .unwrap();
        let want: Vec<_> = events[..middle as usize]
            .iter()
            .rev()
            .take(3)
            .cloned()
            .collect();
        assert_eq!(down, want, "{id} backward from {middle}");
        let filtered = store
            .read_all(
                Position::START,
                ReadDirection::Forward,
                usize::MAX,
                &EventFilter::Stream(id.clone()),
            )
            .await
            .unwrap();
        assert_eq!(&filtered, events, "{id} through $all's filter");
        assert_eq!(store.stream_version(id).await.unwrap(), Version(count));
    }
}

/// Many tasks append with exact expected versions while others read: every
/// read of a stream is its versions 1..n with no gap, n at least what was
/// acknowledged before the read started, however the reads fall between
/// the writer's tail and the indexer's flushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_see_every_acknowledged_event_across_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir.path().join("store"), 7));
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..STREAMS).map(|_| AtomicU64::new(0)).collect());
    let mut writers = Vec::new();
    for task in 0..16 {
        let (store, acked) = (Arc::clone(&store), Arc::clone(&acked));
        writers.push(tokio::spawn(async move {
            for round in 0..60u64 {
                let n = (task * 3 + round as usize) % STREAMS;
                let id = stream(n);
                // Other tasks append to the same streams: retry on a
                // conflict with the version read.
                loop {
                    let version = store.stream_version(&id).await.unwrap();
                    let events = (0..1 + round % 3)
                        .map(|i| NewEvent::new("Placed", vec![task as u8, round as u8, i as u8]))
                        .collect();
                    match store
                        .append(&id, ExpectedVersion::Exact(version), events)
                        .await
                    {
                        Ok(done) => {
                            acked[n].fetch_max(done.last_version.0, Ordering::SeqCst);
                            break;
                        }
                        Err(annals::store::AppendError::WrongExpectedVersion { .. }) => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }));
    }
    let mut readers = Vec::new();
    for task in 0..4 {
        let (store, acked) = (Arc::clone(&store), Arc::clone(&acked));
        readers.push(tokio::spawn(async move {
            let mut reads = 0;
            for round in 0..400 {
                let n = (task * 7 + round) % STREAMS;
                let id = stream(n);
                let floor = acked[n].load(Ordering::SeqCst);
                let forward = common::whole_stream(store.as_ref(), &id).await;
                let versions: Vec<u64> = forward.iter().map(|e| e.version.0).collect();
                assert_eq!(
                    versions,
                    (1..=versions.len() as u64).collect::<Vec<_>>(),
                    "{id}: a gap"
                );
                assert!(
                    versions.len() as u64 >= floor,
                    "{id}: {} events read, {floor} acknowledged before",
                    versions.len()
                );
                let last = store
                    .read_stream(&id, Version::MAX, ReadDirection::Backward, 1)
                    .await
                    .unwrap();
                assert!(
                    last.first().map_or(0, |e| e.version.0) >= floor,
                    "{id}: backward"
                );
                reads += 1;
                tokio::task::yield_now().await;
            }
            reads
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    for reader in readers {
        assert_eq!(reader.await.unwrap(), 400);
    }
    let log = whole_log(store.as_ref()).await;
    check_streams(&store, &log).await;
    store.shutdown().await.unwrap();

    // Reopened, with everything flushed at shutdown.
    let store = open(&dir.path().join("store"), 7);
    assert_eq!(whole_log(&store).await, log);
    check_streams(&store, &log).await;
    store.shutdown().await.unwrap();
}

/// What a crash can leave: the stream index written up to a position
/// (`Mindexed`) with the entries after it in no block, or in blocks a flush
/// wrote before the crash without moving `Mindexed`. Staged by editing a
/// closed store's `log` tree; the open must rebuild the tail from the log
/// and read every stream as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_rebuilds_what_a_crash_left_unindexed() {
    for staged in ["no block after Mindexed", "blocks Mindexed does not cover"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = open(&path, 5);
        for round in 0..40 {
            let id = stream(round % 7);
            let events = (0..1 + round % 4)
                .map(|_| NewEvent::new("Placed", vec![round as u8]))
                .collect();
            store
                .append(&id, ExpectedVersion::Any, events)
                .await
                .unwrap();
        }
        let log = whole_log(&store).await;
        store.shutdown().await.unwrap();

        let cut = log.len() as u64 / 3;
        {
            let db = until_unlocked(|| sled::open(&path)).unwrap();
            let tree = db.open_tree("log").unwrap();
            assert_eq!(
                tree.get(b"Mindexed").unwrap().map(|v| v.to_vec()),
                Some((log.len() as u64).to_be_bytes().to_vec()),
                "a shutdown writes the whole index"
            );
            if staged == "no block after Mindexed" {
                // Every block goes; `Mindexed` says none was written.
                for key in tree.scan_prefix(b"S").keys() {
                    tree.remove(key.unwrap()).unwrap();
                }
                tree.insert(b"Mindexed", &0u64.to_be_bytes()).unwrap();
            } else {
                tree.insert(b"Mindexed", &cut.to_be_bytes()).unwrap();
            }
            db.flush().unwrap();
        }
        let store = open(&path, 5);
        assert_eq!(whole_log(&store).await, log, "{staged}");
        check_streams(&store, &log).await;
        // Appends continue each stream where it ended.
        let id = stream(3);
        let before = store.stream_version(&id).await.unwrap();
        let done = store
            .append(
                &id,
                ExpectedVersion::Exact(before),
                vec![NewEvent::new("Placed", vec![])],
            )
            .await
            .unwrap();
        assert_eq!(done.first_version, before.next(), "{staged}");
        let log = whole_log(&store).await;
        check_streams(&store, &log).await;
        store.shutdown().await.unwrap();
    }
}

/// A stream that took more versions between two flushes than one block
/// holds (512) gets several blocks, none past 4 KiB, and reads across them
/// both ways, from any version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_a_block_reads_across_its_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = open(&path, 5_000);
    let long = stream(0);
    for round in 0..130u64 {
        let events = (0..10)
            .map(|i| NewEvent::new("Placed", (round * 10 + i).to_be_bytes().to_vec()))
            .collect();
        store
            .append(&long, ExpectedVersion::Any, events)
            .await
            .unwrap();
        store
            .append(
                &stream(1),
                ExpectedVersion::Any,
                vec![NewEvent::new("Placed", vec![])],
            )
            .await
            .unwrap();
    }
    let log = whole_log(&store).await;
    // From the tail, before any flush.
    check_streams(&store, &log).await;
    store.shutdown().await.unwrap();
    {
        let db = until_unlocked(|| sled::open(&path)).unwrap();
        let tree = db.open_tree("log").unwrap();
        let blocks: Vec<usize> = tree
            .scan_prefix(b"Sorder-0\0")
            .values()
            .map(|value| value.unwrap().len())
            .collect();
        assert_eq!(
            blocks,
            vec![4096, 4096, 2208],
            "1,300 versions in blocks of 512"
        );
    }
    // From the blocks.
    let store = open(&path, 5_000);
    check_streams(&store, &log).await;
    for version in [1, 511, 512, 513, 1024, 1025, 1300] {
        let one = store
            .read_stream(&long, Version(version), ReadDirection::Forward, 1)
            .await
            .unwrap();
        assert_eq!(one[0].version, Version(version));
        assert_eq!(one[0].payload, (version - 1).to_be_bytes().to_vec());
        let back = store
            .read_stream(&long, Version(version), ReadDirection::Backward, 2)
            .await
            .unwrap();
        assert_eq!(back[0].version, Version(version));
    }
    store.shutdown().await.unwrap();
}
