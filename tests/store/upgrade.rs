//! The in-place upgrade from format 2, killed (`kill -9`) at random points
//! and run again until it finishes: every killed state is refused by this
//! build (and marked with this format, which the format-2 build refuses), and the
//! finished store reads exactly what was written, with sound indexes.
//!
//! The format-2 store is made from one of this format by moving its
//! records back under `E` + position and its ids under `I` + id
//! (docs/design.md's layouts), so that it can be
//! large enough for the upgrade to take many batches;
//! `tests/fixtures/format2` is a store written by the format-2 build
//! itself, which the upgrade's unit tests and `tests/cli.rs` use.
//! `ANNALS_UPGRADE_KILLS=N` sets the kills (default 6).

use std::path::Path;
use std::time::Duration;

use annals::store::FORMAT_VERSION;
use annals::{EventStore, ExpectedVersion, NewEvent, SledStore, StoreError, StreamId};

use crate::chunks;
use crate::common::child::{self, Child};
use crate::common::{until_unlocked, whole_log};

const CHILD_DIR: &str = "ANNALS_UPGRADE_CHILD_DIR";
const EVENTS: u64 = 60_000;

/// Turns the format-3 store at `path` into a format-2 one.
fn downgrade(path: &Path) {
    let db = until_unlocked(|| sled::open(path)).unwrap();
    let log = db.open_tree("log").unwrap();
    chunks::ids_as_keys(&log);
    let records = chunks::stored_records(&log);
    for entry in log.scan_prefix([b'C']) {
        log.remove(entry.unwrap().0).unwrap();
    }
    for (position, record) in (1u64..).zip(records) {
        let mut key = vec![b'E'];
        key.extend_from_slice(&position.to_be_bytes());
        log.insert(key, record).unwrap();
    }
    log.insert("Mformat", &2u32.to_be_bytes()).unwrap();
    db.flush().unwrap();
}

fn format_of(path: &Path) -> u32 {
    let db = until_unlocked(|| sled::open(path)).unwrap();
    let found = db
        .open_tree("log")
        .unwrap()
        .get("Mformat")
        .unwrap()
        .unwrap();
    u32::from_be_bytes(found.as_ref().try_into().unwrap())
}

/// The child: upgrades the store in `CHILD_DIR` until killed.
#[test]
#[ignore = "run by an_upgrade_killed_anywhere_finishes_on_the_next_run as a child process"]
fn upgrade_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    println!("STARTED");
    let start = std::time::Instant::now();
    let summary = until_unlocked(|| SledStore::upgrade(&dir)).unwrap();
    println!("DONE in {:?}: {summary:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_killed_anywhere_finishes_on_the_next_run() {
    let kills: u64 = crate::common::setting("ANNALS_UPGRADE_KILLS", 6);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = SledStore::open(&path).unwrap();
    for append in 0..EVENTS / 100 {
        let stream = StreamId::new(format!("order-{}", append % 97)).unwrap();
        let events = (0..100)
            .map(|i| NewEvent::new("Placed", format!("{append}/{i}").into_bytes()))
            .collect();
        store
            .append(&stream, ExpectedVersion::Any, events)
            .await
            .unwrap();
    }
    let written = whole_log(&store).await;
    store.shutdown().await.unwrap();
    let template = dir.path().join("format2");
    std::fs::rename(&path, &template).unwrap();
    downgrade(&template);
    assert!(matches!(
        until_unlocked(|| SledStore::open(&template)),
        Err(StoreError::FormatMismatch { found: 2, .. })
    ));

    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let (mut done, mut rounds, mut before_marking, mut part_way) = (0, 0, 0, 0);
    // Rounds on fresh copies of the format-2 store until `kills` kills.
    while done < kills {
        rounds += 1;
        let _ = std::fs::remove_dir_all(&path);
        copy_dir(&template, &path);
        let mut finished_by_a_child = false;
        while done < kills && !finished_by_a_child {
            let mut command = child::ignored_test(module_path!(), "upgrade_child");
            command.env(CHILD_DIR, &path);
            let mut running = Child::spawn(command);
            // libtest prints the test's name on the same line first.
            let started =
                running.wait_for_line(Duration::from_secs(60), |line| line.ends_with("STARTED"));
            assert!(started.is_some(), "the child did not start");
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // The upgrade of 60,000 events takes a few hundred milliseconds.
            std::thread::sleep(Duration::from_micros(seed % 300_000));
            let lines = running.kill();
            done += 1;
            if lines.iter().any(|line| line.starts_with("DONE")) {
                finished_by_a_child = true;
                continue;
            }
            // Killed part-way (or before it began): this build refuses the
            // store, and it is either untouched or marked with this build's
            // format, which the format-2 build refuses.
            match until_unlocked(|| SledStore::open(&path)) {
                Err(StoreError::FormatMismatch { found: 2, .. }) => {}
                // The upgrade finished just before the kill, unprinted.
                Ok(store) => {
                    store.shutdown().await.unwrap();
                    finished_by_a_child = true;
                    continue;
                }
                Err(other) => panic!("a killed upgrade left {other}"),
            }
            match format_of(&path) {
                2 => before_marking += 1,
                format if format == FORMAT_VERSION => part_way += 1,
                other => panic!("a killed upgrade left format {other}"),
            }
        }
        let last = until_unlocked(|| SledStore::upgrade(&path)).unwrap();
        assert!(finished_by_a_child || last.found_format == 2, "{last:?}");
        let store = until_unlocked(|| SledStore::open(&path)).unwrap();
        let read = whole_log(&store).await;
        assert_eq!(read.len(), written.len());
        assert!(
            read == written,
            "the upgraded log differs from what was written"
        );
        let report = annals::ops::verify(&store).await.unwrap();
        assert!(report.is_sound(), "{:?}", report.violations);
        assert_eq!(report.events, EVENTS);
        store.shutdown().await.unwrap();
    }
    println!(
        "upgrade_kills={kills} rounds={rounds} before_marking={before_marking} \
         part_way={part_way} events={EVENTS} lost=0 sound=true"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A format-3 store (every stream entry written with its group, one key
/// per event, no `Mindexed`) is refused with its format, and the upgrade
/// makes it this build's by marking it: its events and streams read back
/// as they were. Staged with one one-event append per session (a shutdown
/// writes the session's stream entries, here one per stream), which
/// writes exactly format 3's stream keys, then given format 3's id keys
/// and meta records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_3_store_is_refused_then_upgraded_by_marking_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    for n in 0..30u8 {
        let store = until_unlocked(|| SledStore::open(&path)).unwrap();
        let stream = StreamId::new(format!("order-{}", n % 4)).unwrap();
        store
            .append(
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::new("Placed", vec![n])],
            )
            .await
            .unwrap();
        store.shutdown().await.unwrap();
    }
    let store = until_unlocked(|| SledStore::open(&path)).unwrap();
    let log = whole_log(&store).await;
    store.shutdown().await.unwrap();
    {
        let db = until_unlocked(|| sled::open(&path)).unwrap();
        let tree = db.open_tree("log").unwrap();
        assert_eq!(tree.scan_prefix(b"S").count(), 30, "one key per event");
        crate::chunks::ids_as_keys(&tree);
        tree.insert(b"Mformat", &3u32.to_be_bytes()).unwrap();
        tree.remove(b"Mindexed").unwrap();
        db.flush().unwrap();
    }
    match until_unlocked(|| SledStore::open(&path)) {
        Err(StoreError::FormatMismatch { found: 3, expected }) => {
            assert_eq!(expected, FORMAT_VERSION)
        }
        other => panic!("expected FormatMismatch, got {:?}", other.map(|_| ())),
    }
    let summary = until_unlocked(|| SledStore::upgrade(&path)).unwrap();
    assert_eq!((summary.found_format, summary.chunks_written), (3, 0));
    let store = until_unlocked(|| SledStore::open(&path)).unwrap();
    assert_eq!(whole_log(&store).await, log);
    for event in &log {
        let found = store.read_event(event.event_id).await.unwrap();
        assert_eq!(found.as_ref(), Some(event));
    }
    for n in 0..4 {
        let stream = StreamId::new(format!("order-{n}")).unwrap();
        let own: Vec<_> = log
            .iter()
            .filter(|e| e.stream_id == stream)
            .cloned()
            .collect();
        assert_eq!(crate::common::whole_stream(&store, &stream).await, own);
    }
    store.shutdown().await.unwrap();
}
