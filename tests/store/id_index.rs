//! The event-id index of format 5, written off the commit path as sorted
//! runs that the indexer merges four at a time. These tests flush every
//! few events, so that lookups (`read_event`, and the idempotency check of
//! every append) meet every state: ids in the tail, in a flush under way,
//! in runs, in runs a merge is replacing, and after an open that removes
//! what a crash left and rebuilds the tail.

use crate::common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use annals::store::SledStoreConfig;
use annals::{EventStore, ExpectedVersion, NewEvent, Position, SledStore, StreamId};
use common::{until_unlocked, whole_log};
use uuid::Uuid;

fn open(path: &Path, flush_every: usize) -> SledStore {
    until_unlocked(|| {
        SledStore::open_with(SledStoreConfig::new(path).stream_index_flush_events(flush_every))
    })
    .expect("open")
}

/// An acknowledged append: its stream, its event, and where it went.
type Acked = (StreamId, NewEvent, Position);

/// Every acknowledged event is found by its id at its position, and a
/// retry of it is answered with that position, writing nothing.
async fn check_ids(store: &SledStore, acked: &[Acked]) {
    let head = store.head_position();
    for (stream, event, position) in acked {
        let found = store.read_event(event.event_id).await.unwrap();
        assert_eq!(
            found.map(|e| e.position),
            Some(*position),
            "id {}",
            event.event_id
        );
        let retry = store
            .append(stream, ExpectedVersion::Any, vec![event.clone()])
            .await
            .unwrap();
        assert_eq!(
            retry.first_position, *position,
            "retry of {}",
            event.event_id
        );
    }
    assert_eq!(store.head_position(), head, "a retry wrote something");
}

/// 16 writers append (fresh v7 ids, and ids counting from 1, which share
/// all but their last bits) and retry earlier appends, while 4 readers
/// look up acknowledged ids: with a flush every 5 events the indexer
/// merges runs all the time, and no lookup may miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ids_are_found_while_runs_are_flushed_and_merged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = Arc::new(open(&path, 5));
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let writers: Vec<_> = (0..16u128)
        .map(|writer| {
            let (store, acked) = (Arc::clone(&store), Arc::clone(&acked));
            tokio::spawn(async move {
                let stream = StreamId::new(format!("ids-{writer}")).unwrap();
                for n in 0..150u128 {
                    let mut event = NewEvent::new("Happened", n.to_be_bytes().to_vec());
                    if n % 2 == 0 {
                        event = event.with_id(Uuid::from_u128(1 + writer * 1000 + n));
                    }
                    let done = store
                        .append(&stream, ExpectedVersion::Any, vec![event.clone()])
                        .await
                        .unwrap();
                    if n % 10 == 9 {
                        // A retry of one acknowledged a while ago.
                        let old = acked.lock().unwrap()[(n as usize * 7) % 10].clone();
                        let retry = store
                            .append(&old.0, ExpectedVersion::Any, vec![old.1.clone()])
                            .await
                            .unwrap();
                        assert_eq!(retry.first_position, old.2, "retry of {}", old.1.event_id);
                    }
                    acked
                        .lock()
                        .unwrap()
                        .push((stream.clone(), event, done.first_position));
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..4usize)
        .map(|reader| {
            let (store, acked) = (Arc::clone(&store), Arc::clone(&acked));
            tokio::spawn(async move {
                let mut lookups = 0u64;
                let mut n = reader;
                loop {
                    let (len, pick) = {
                        let acked = acked.lock().unwrap();
                        (acked.len(), acked.get(n % acked.len().max(1)).cloned())
                    };
                    if len >= 16 * 150 {
                        return lookups;
                    }
                    if let Some((_, event, position)) = pick {
                        let found = store.read_event(event.event_id).await.unwrap();
                        assert_eq!(found.map(|e| e.position), Some(position));
                        lookups += 1;
                    }
                    n = n.wrapping_mul(31).wrapping_add(17);
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    for reader in readers {
        assert!(reader.await.unwrap() > 0, "a reader looked nothing up");
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(store.head_position(), Position(16 * 150));
    // An id stored on one stream is refused on another.
    let (_, taken, _) = &acked[3];
    let other = StreamId::new("ids-other").unwrap();
    assert!(store
        .append(&other, ExpectedVersion::Any, vec![taken.clone()])
        .await
        .is_err());
    check_ids(&store, &acked).await;
    store.shutdown().await.unwrap();
    // Merges ran: a flush every 5 events wrote about 480 runs.
    let runs = runs_with(&path, b'J').len();
    assert!(runs < 16 * 150 / 5 / 2, "{runs} runs left: no merge ran");
    let store = open(&path, 5);
    check_ids(&store, &acked).await;
    assert_eq!(whole_log(&store).await.len(), 16 * 150);
    store.shutdown().await.unwrap();
}

/// The keys of `tag` (`J` blocks, `K` summaries) of the store at `path`,
/// by run number.
fn runs_with(path: &Path, tag: u8) -> Vec<u64> {
    let db = until_unlocked(|| sled::open(path)).unwrap();
    let log = db.open_tree("log").unwrap();
    let mut runs: Vec<u64> = log
        .scan_prefix([tag])
        .keys()
        .map(|key| u64::from_be_bytes(key.unwrap()[1..9].try_into().unwrap()))
        .collect();
    runs.dedup();
    drop(log);
    drop(db);
    runs
}

/// What a crash leaves: runs that `Mruns` does not list (a flush or merge
/// cut short), and a run list and `Mindexed` from before the last flushes.
/// Opening removes the unlisted runs and rebuilds the tail from the log:
/// every id is found, retries are recognised, and appends go on.
#[tokio::test]
async fn an_open_removes_unfinished_runs_and_rebuilds_what_they_held() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = open(&path, 7);
    let stream = StreamId::new("ids-crash").unwrap();
    let mut acked = Vec::new();
    for n in 0..100u64 {
        let event = NewEvent::new("Happened", n.to_be_bytes().to_vec());
        let done = store
            .append(&stream, ExpectedVersion::Any, vec![event.clone()])
            .await
            .unwrap();
        acked.push((stream.clone(), event, done.first_position));
    }
    store.shutdown().await.unwrap();
    let listed = runs_with(&path, b'J');
    assert!(!listed.is_empty());
    {
        let db = until_unlocked(|| sled::open(&path)).unwrap();
        let log = db.open_tree("log").unwrap();
        // Two runs that no list names, numbered after every listed one,
        // as a flush or a merge cut short leaves them.
        for run in [u64::MAX - 1, 1_000_000] {
            let mut key = vec![b'J'];
            key.extend_from_slice(&run.to_be_bytes());
            key.extend_from_slice(&Uuid::now_v7().as_u128().to_be_bytes());
            let mut value = Uuid::now_v7().as_u128().to_be_bytes().to_vec();
            value.extend_from_slice(&1u64.to_be_bytes());
            log.insert(key, value).unwrap();
            let mut summary = vec![b'K'];
            summary.extend_from_slice(&run.to_be_bytes());
            summary.extend_from_slice(&0u32.to_be_bytes());
            log.insert(summary, vec![0u8; 8]).unwrap();
        }
        // The run list and `Mindexed` of before the first flush: the runs
        // were written, their listing was not.
        let runs = log.get(b"Mruns").unwrap().unwrap();
        log.insert(b"Mruns", &runs[..8]).unwrap();
        log.insert(b"Mindexed", &0u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let store = open(&path, 7);
    check_ids(&store, &acked).await;
    let done = store
        .append(
            &stream,
            ExpectedVersion::Exact(annals::Version(100)),
            vec![NewEvent::new("Happened", vec![])],
        )
        .await
        .unwrap();
    assert_eq!(done.first_position, Position(101));
    store.shutdown().await.unwrap();
    let blocks = runs_with(&path, b'J');
    assert!(
        !blocks
            .iter()
            .any(|run| listed.contains(run) || *run == u64::MAX - 1 || *run == 1_000_000),
        "runs no list named are left: {blocks:?} (unlisted: {listed:?})"
    );
    let summaries = runs_with(&path, b'K');
    assert!(
        !summaries.contains(&1_000_000) && !summaries.contains(&(u64::MAX - 1)),
        "summaries of unlisted runs are left: {summaries:?}"
    );
    let store = open(&path, 7);
    check_ids(&store, &acked).await;
    store.shutdown().await.unwrap();
}
