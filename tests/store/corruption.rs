//! Damaged store files (invariant I6): flipped bytes in `db`, `conf`,
//! `snap.*` and `blobs/*`, truncated files and deleted ones give a typed
//! error on open or on read, never a panic, and never silently wrong data.
//!
//! One store is written once as a template; every case copies it, damages
//! the copy (chosen by a seed, so a failure repeats), opens it in this
//! process and reads everything back. Whatever the store returns must be
//! byte-identical to what was written. sled cannot tell a damaged tail of
//! its log from a torn write, so it may recover a *shorter prefix* of the
//! log: that is accepted only when it is a gapless prefix of `$all`, every
//! stream agrees with it and the store's head is its last position.
//!
//! `ANNALS_CORRUPTION_CASES=N` runs N cases (default 300, a few seconds).

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use annals::store::{Durability, EventFilter, Metadata, ReadDirection, SledStoreConfig, Snapshot};
use annals::{
    EventStore, ExpectedVersion, NewEvent, Position, RecordedEvent, SledStore, StreamId, Version,
};
use uuid::Uuid;

/// A small deterministic generator (splitmix64), so a case is its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the template session wrote.
struct Written {
    log: Vec<RecordedEvent>,
    snapshots: BTreeMap<StreamId, Snapshot>,
    checkpoints: Vec<Position>,
}

const STREAMS: [&str; 4] = ["order-1", "order-2", "account-7", "audit-x"];
const CHECKPOINT: &str = "projection-a";

fn stream(id: &str) -> StreamId {
    StreamId::new(id).expect("valid stream id")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Writes the template: several streams, multi-event appends, metadata, a
/// payload large enough for sled to put it in a blob file, snapshots and
/// checkpoints; then closes it and waits for sled to let go of its files.
fn write_template(path: &Path) -> Written {
    let rt = runtime();
    let written = rt.block_on(async {
        let store = SledStore::open(path).expect("open template");
        let mut snapshots = BTreeMap::new();
        let mut checkpoints = Vec::new();
        let mut appended_events = Vec::new();
        for round in 0..40u64 {
            let id = stream(STREAMS[(round % 4) as usize]);
            let count = 1 + (round % 3) as usize;
            let events = (0..count)
                .map(|i| {
                    let mut metadata = Metadata::new(Some(Uuid::now_v7()), None);
                    metadata
                        .extra
                        .insert("round".into(), format!("{round}-{i}"));
                    let payload = if round == 21 && i == 0 {
                        vec![0xB7; 200 * 1024]
                    } else {
                        format!("payload {round}/{i} {}", "x".repeat(round as usize * 7))
                            .into_bytes()
                    };
                    NewEvent::new(format!("Happened{}", round % 5), payload).with_metadata(metadata)
                })
                .collect::<Vec<NewEvent>>();
            let appended = store
                .append(&id, ExpectedVersion::Any, events.clone())
                .await
                .expect("append");
            for (offset, event) in events.into_iter().enumerate() {
                let offset = offset as u64;
                appended_events.push((
                    id.clone(),
                    Version(appended.first_version.0 + offset),
                    Position(appended.first_position.0 + offset),
                    event,
                ));
            }
            if round % 9 == 8 {
                let snapshot = Snapshot {
                    version: appended.last_version,
                    payload: format!("state of {id} at {}", appended.last_version.0).into_bytes(),
                };
                store
                    .save_snapshot(&id, snapshot.clone())
                    .await
                    .expect("snapshot");
                snapshots.insert(id.clone(), snapshot);
            }
            if round % 13 == 12 {
                store
                    .save_checkpoint(CHECKPOINT, appended.last_position)
                    .await
                    .expect("checkpoint");
                checkpoints.push(appended.last_position);
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
            .expect("read template");
        // The reference is what was appended, not what the store read back.
        assert_eq!(log.len(), appended_events.len());
        for (read, (id, version, position, event)) in log.iter().zip(&appended_events) {
            let as_appended = RecordedEvent {
                event_id: event.event_id,
                stream_id: id.clone(),
                version: *version,
                position: *position,
                event_type: event.event_type.clone(),
                schema_version: event.schema_version,
                recorded_at_micros: read.recorded_at_micros,
                metadata: event.metadata.clone(),
                payload: event.payload.clone(),
            };
            assert!(*read == as_appended, "the template reads back altered");
        }
        store.shutdown().await.expect("shutdown");
        Written {
            log,
            snapshots,
            checkpoints,
        }
    });
    // sled's I/O pool lets go of the files a few milliseconds after the last
    // handle; the copies must not race with it.
    std::thread::sleep(Duration::from_millis(300));
    written
}

/// Opens the template once more (which makes sled write `snap.*`) and
/// checks it is whole.
fn reopen_once(path: &Path, written: &Written) {
    let outcome = check_damaged(path, written, false);
    assert!(outcome.intact, "the undamaged template: {outcome:?}");
    std::thread::sleep(Duration::from_millis(300));
}

fn files_of(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files.extend(files_of(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy");
    for entry in std::fs::read_dir(from).expect("read template") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy file");
        }
    }
}

/// Damages the copy at `dir`; returns what was done, for the failure message.
fn damage(dir: &Path, rng: &mut Rng) -> String {
    let files = files_of(dir);
    let named = |name: &str| files.iter().find(|f| f.ends_with(name)).cloned();
    let db = named("db").expect("db file");
    // Mostly the log itself, where the events are.
    let target = match rng.below(10) {
        0 => named("conf").expect("conf file"),
        1 => files
            .iter()
            .find(|f| {
                f.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("snap."))
            })
            .cloned()
            .unwrap_or_else(|| db.clone()),
        2 => files
            .iter()
            .find(|f| f.parent().is_some_and(|p| p.ends_with("blobs")))
            .cloned()
            .unwrap_or_else(|| db.clone()),
        _ => db.clone(),
    };
    let name = target.strip_prefix(dir).unwrap().display().to_string();
    let mut bytes = std::fs::read(&target).expect("read target");
    match rng.below(10) {
        // Delete the file.
        0 => {
            std::fs::remove_file(&target).expect("delete");
            format!("deleted {name}")
        }
        // Truncate it.
        1..=2 => {
            let len = rng.below(bytes.len() as u64 + 1) as usize;
            bytes.truncate(len);
            std::fs::write(&target, &bytes).expect("truncate");
            format!("truncated {name} to {len} of its bytes")
        }
        // Flip 1 to 4 bytes, half the time among the written (non-zero)
        // bytes, since sled's files are mostly zero-filled segments.
        _ => {
            if bytes.is_empty() {
                return format!("{name} is empty, left alone");
            }
            let written: Vec<usize> = bytes
                .iter()
                .enumerate()
                .filter(|(_, b)| **b != 0)
                .map(|(i, _)| i)
                .collect();
            let mut flips = Vec::new();
            for _ in 0..1 + rng.below(4) {
                let offset = if rng.below(2) == 0 && !written.is_empty() {
                    written[rng.below(written.len() as u64) as usize]
                } else {
                    rng.below(bytes.len() as u64) as usize
                };
                let mask = 1 + rng.below(255) as u8;
                bytes[offset] ^= mask;
                flips.push(format!("{offset}^{mask:#04x}"));
            }
            std::fs::write(&target, &bytes).expect("write flips");
            format!("flipped {name} at {}", flips.join(","))
        }
    }
}

/// How one damaged store behaved.
#[derive(Debug, Default)]
struct Outcome {
    refused_open: bool,
    read_errors: u64,
    /// The store opened and its head was behind the template's.
    shorter_prefix: bool,
    /// The head the damaged store opened with.
    head: u64,
    /// The store opened and gave back every event.
    intact: bool,
}

/// Opens the damaged copy and checks everything it gives back. Panics
/// (failing the case) on silently wrong data; returns how it behaved.
fn check_damaged(path: &Path, written: &Written, append_after: bool) -> Outcome {
    let mut outcome = Outcome::default();
    let config = SledStoreConfig::new(path)
        .durability(Durability::Flush)
        .cache_capacity_bytes(4 << 20);
    let store = match SledStore::open_with(config) {
        Ok(store) => store,
        Err(_typed) => {
            outcome.refused_open = true;
            return outcome;
        }
    };
    let full = &written.log;
    let head = store.head_position().0 as usize;
    assert!(
        head <= full.len(),
        "head {head} beyond the {} events written",
        full.len()
    );
    let kept = &full[..head];
    runtime().block_on(async {
        match store
            .read_all(
                Position::START,
                ReadDirection::Forward,
                usize::MAX,
                &EventFilter::All,
            )
            .await
        {
            Ok(log) => assert!(
                log == kept,
                "$all is not the gapless prefix up to head {head}: {} events read",
                log.len()
            ),
            Err(_) => outcome.read_errors += 1,
        }
        match store
            .read_all(Position::END, ReadDirection::Backward, 5, &EventFilter::All)
            .await
        {
            Ok(tail) => {
                let expected: Vec<_> = kept.iter().rev().take(5).cloned().collect();
                assert!(tail == expected, "backward $all differs from the prefix");
            }
            Err(_) => outcome.read_errors += 1,
        }
        for id in STREAMS.map(stream) {
            let expected: Vec<_> = kept.iter().filter(|e| e.stream_id == id).cloned().collect();
            match store
                .read_stream(&id, Version::FIRST, ReadDirection::Forward, usize::MAX)
                .await
            {
                Ok(events) => assert!(events == expected, "{id} differs from the prefix"),
                Err(_) => outcome.read_errors += 1,
            }
            match store
                .read_stream(&id, Version::MAX, ReadDirection::Backward, 3)
                .await
            {
                Ok(events) => {
                    let tail: Vec<_> = expected.iter().rev().take(3).cloned().collect();
                    assert!(events == tail, "{id} backward differs from the prefix");
                }
                Err(_) => outcome.read_errors += 1,
            }
            match store.stream_version(&id).await {
                Ok(version) => assert_eq!(
                    version,
                    Version(expected.len() as u64),
                    "{id}: stored head disagrees with its events"
                ),
                Err(_) => outcome.read_errors += 1,
            }
            match store.load_snapshot(&id).await {
                // A snapshot is a cache: gone is fine, altered is not.
                Ok(Some(snapshot)) => assert!(
                    written.snapshots.get(&id) == Some(&snapshot),
                    "{id}: snapshot altered"
                ),
                Ok(None) => {}
                Err(_) => outcome.read_errors += 1,
            }
        }
        match store.load_checkpoint(CHECKPOINT).await {
            Ok(Some(position)) => assert!(
                written.checkpoints.contains(&position),
                "checkpoint {position:?} was never saved"
            ),
            Ok(None) => {}
            Err(_) => outcome.read_errors += 1,
        }
        // The log goes on after what it kept: a new event never reuses a
        // position.
        if !append_after {
            return store.shutdown().await.expect("shutdown");
        }
        let appended = store
            .append(
                &stream("after-damage"),
                ExpectedVersion::Any,
                vec![NewEvent::new("Appended", b"after".to_vec())],
            )
            .await;
        if let Ok(appended) = appended {
            assert_eq!(appended.first_position, Position(head as u64 + 1));
        }
        let _ = store.shutdown().await;
    });
    outcome.shorter_prefix = head < full.len();
    outcome.head = head as u64;
    outcome.intact = head == full.len() && outcome.read_errors == 0;
    outcome
}

/// Panics seen by the panic hook, including those the store catches itself
/// (sled 0.34 panics on some damage; the store turns those into errors).
static PANICS_SEEN: AtomicU64 = AtomicU64::new(0);

#[test]
fn damaged_files_give_typed_errors_never_panics_or_wrong_data() {
    let cases: u64 = crate::common::setting("ANNALS_CORRUPTION_CASES", 300);
    let first_seed: u64 = crate::common::setting("ANNALS_CORRUPTION_SEED", 1);
    let root = tempfile::tempdir().expect("temp dir");
    let template = root.path().join("template");
    let written = write_template(&template);
    assert!(written.log.len() > 60 && !written.snapshots.is_empty());
    // sled writes its page-table snapshot (`snap.*`) when it recovers, so a
    // second template, opened once more, has one; cases alternate.
    let reopened = root.path().join("template-reopened");
    copy_dir(&template, &reopened);
    reopen_once(&reopened, &written);
    assert!(
        files_of(&reopened)
            .iter()
            .any(|f| f.to_string_lossy().contains("snap.")),
        "sled wrote no snapshot file on reopening"
    );
    let templates = [template, reopened];

    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {
        PANICS_SEEN.fetch_add(1, Ordering::Relaxed);
    }));

    // The undamaged copy must come back whole, or the checks prove nothing.
    let baseline = root.path().join("baseline");
    copy_dir(&templates[0], &baseline);
    let outcome = check_damaged(&baseline, &written, true);
    assert!(outcome.intact, "the undamaged copy: {outcome:?}");
    std::fs::remove_dir_all(&baseline).expect("clean up");

    // Named damages first, each on the template with a `snap.*` file, so
    // that the common ones never depend on what the seeds happen to pick.
    for (what, expect_refused) in [
        ("delete conf", true),
        ("delete db", true),
        ("delete snap", false),
        ("truncate db to 0", false),
        ("truncate db to 100", false),
        ("truncate db to half", false),
        ("truncate conf to 3", false),
        ("zero the first 64 bytes of db", false),
    ] {
        let case = root.path().join("named");
        copy_dir(&templates[1], &case);
        let files = files_of(&case);
        let find = |prefix: &str| {
            files
                .iter()
                .find(|f| f.file_name().unwrap().to_string_lossy().starts_with(prefix))
                .cloned()
                .expect("file of the template")
        };
        let (db, conf) = (find("db"), find("conf"));
        let len = std::fs::metadata(&db).unwrap().len();
        let truncate = |path: &Path, to: u64| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap()
                .set_len(to)
                .unwrap()
        };
        match what {
            "delete conf" => std::fs::remove_file(&conf).unwrap(),
            "delete db" => std::fs::remove_file(&db).unwrap(),
            "delete snap" => std::fs::remove_file(find("snap.")).unwrap(),
            "truncate db to 0" => truncate(&db, 0),
            "truncate db to 100" => truncate(&db, 100),
            "truncate db to half" => truncate(&db, len / 2),
            "truncate conf to 3" => truncate(&conf, 3),
            _ => {
                let mut bytes = std::fs::read(&db).unwrap();
                bytes[..64].fill(0);
                std::fs::write(&db, bytes).unwrap();
            }
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| check_damaged(&case, &written, true)))
            .unwrap_or_else(|_| panic!("{what}: a panic or wrong data"));
        println!("{what}: {outcome:?}");
        if expect_refused {
            assert!(outcome.refused_open, "{what}: opened anyway");
        }
        std::fs::remove_dir_all(&case).unwrap();
    }

    let written = std::sync::Arc::new(written);
    let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
    let mut failures = Vec::new();
    for seed in first_seed..first_seed + cases {
        let case = root.path().join(format!("case-{seed}"));
        copy_dir(&templates[(seed % 2) as usize], &case);
        let done = damage(&case, &mut Rng(seed));
        // Each case on its own thread, so that a hang inside sled fails
        // the test with its seed instead of stalling CI.
        let (report, outcome) = mpsc::channel();
        let (path, written_ref) = (case.clone(), std::sync::Arc::clone(&written));
        std::thread::spawn(move || {
            let result = catch_unwind(AssertUnwindSafe(|| {
                check_damaged(&path, &written_ref, true)
            }));
            let _ = report.send(result.map_err(|panic| {
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default()
            }));
        });
        match outcome.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(outcome)) => {
                if std::env::var_os("ANNALS_CORRUPTION_VERBOSE").is_some() {
                    println!("seed {seed}: {done}: {outcome:?}");
                }
                *totals.entry("cases").or_default() += 1;
                if outcome.refused_open {
                    *totals.entry("refused_open").or_default() += 1;
                } else if outcome.read_errors > 0 {
                    *totals.entry("read_errors").or_default() += 1;
                } else if outcome.intact {
                    *totals.entry("intact").or_default() += 1;
                }
                if outcome.shorter_prefix {
                    *totals.entry("shorter_prefix").or_default() += 1;
                }
            }
            Ok(Err(message)) => failures.push(format!("seed {seed} ({done}): {message}")),
            Err(_) => failures.push(format!("seed {seed} ({done}): no answer within 20 s")),
        }
        let _ = std::fs::remove_dir_all(&case);
    }
    std::panic::set_hook(default_hook);
    let totals: Vec<String> = totals.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "corruption {} panic_hook_calls={} failures={}",
        totals.join(" "),
        PANICS_SEEN.load(Ordering::Relaxed),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
