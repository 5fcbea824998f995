//! The in-place upgrade of a format-2 or format-3 store to this build's
//! format (docs/design.md, "Upgrading a format-2 or format-3 store"). From
//! format 2, each event's `E` record moves, byte for byte, into chunks,
//! batch by batch, each batch one atomic sled batch, so that a killed
//! upgrade leaves a store that running the upgrade again finishes. From
//! format 3, only the format record and `Mindexed` are written.

use std::path::Path;
use std::sync::Arc;

use super::durability::Syncer;
use super::format::{
    chunk_key, corrupt, decode_u64, last_position, stage_chunks, stored_head, EVENT,
    FORMAT_VERSION, META_FORMAT, META_INDEXED, META_UPGRADING,
};
use super::{ack_mark, check_path, open_db, sled_error, wait_for_release, Counters, Durability};
use super::{SledStore, SledStoreConfig};
use crate::error::StoreError;

/// Events moved per sled batch.
pub(super) const EVENTS_PER_BATCH: usize = 4096;

/// What [`SledStore::upgrade`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct UpgradeSummary {
    /// The format the store had when this call found it: 2 or 3, or
    /// [`FORMAT_VERSION`] when it was already upgraded (then nothing was
    /// written).
    pub found_format: u32,
    /// The events the store holds.
    pub events: u64,
    /// The chunks this call wrote.
    pub chunks_written: u64,
}

impl SledStore {
    /// Upgrades the format-2 or format-3 store at `path` to
    /// [`FORMAT_VERSION`] in place, or finishes an upgrade that was
    /// interrupted; a store already at this format is left as it is.
    /// Blocking: from format 2 it reads and rewrites every event (call it
    /// from `spawn_blocking` in async code); from format 3 it writes two
    /// records. Positions,
    /// versions, ids, timestamps, metadata and payloads are kept byte for
    /// byte; snapshots and checkpoints are not touched. The result is
    /// flushed and fdatasynced before this returns.
    ///
    /// While an upgrade is under way (or after it was killed), opening the
    /// store is refused, by this build with `FormatMismatch { found: 2 }`
    /// and by an older build with a `FormatMismatch` of this format: no
    /// build ever reads a half-moved log.
    ///
    /// # Errors
    /// [`StoreError::InUse`] when a store has the directory open;
    /// [`StoreError::NotAStore`]; [`StoreError::FormatMismatch`] for a
    /// format other than 2, 3 or this one; [`StoreError::ShorterThanAcknowledged`]
    /// when sled recovered fewer events than the store had acknowledged
    /// (see [`SledStore::upgrade_with`] to accept the loss);
    /// [`StoreError::Corrupt`] when the format-2 log has a gap or
    /// disagrees with its stored head (nothing is changed then: the build
    /// that wrote it still opens it, and its `verify` reports the damage).
    pub fn upgrade(path: impl AsRef<Path>) -> Result<UpgradeSummary, StoreError> {
        Self::upgrade_with(&SledStoreConfig::new(path.as_ref()))
    }

    /// As [`SledStore::upgrade`], with `config`'s path, cache size and
    /// [`accept_lost_events`](SledStoreConfig::accept_lost_events): with it
    /// set, a format-2 log shorter than the store had acknowledged is
    /// upgraded as it is and the mark lowered to it, durably (as opening
    /// with it does), instead of refused.
    ///
    /// # Errors
    /// As [`SledStore::upgrade`].
    pub fn upgrade_with(config: &SledStoreConfig) -> Result<UpgradeSummary, StoreError> {
        upgrade(config, EVENTS_PER_BATCH, usize::MAX)
    }
}

/// The upgrade, `per_batch` events to a batch, stopping (as a kill would)
/// after `max_batches` batches.
pub(super) fn upgrade(
    config: &SledStoreConfig,
    per_batch: usize,
    max_batches: usize,
) -> Result<UpgradeSummary, StoreError> {
    let path = config.path.as_path();
    check_path(path)?;
    if !path.join("db").exists() {
        return Err(StoreError::NotAStore(path.display().to_string()));
    }
    let sled_config = sled::Config::new()
        .path(path)
        .cache_capacity(config.cache_capacity_bytes)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(None);
    let db = open_db(path, &sled_config)?;
    let result = upgrade_log(config, &db, per_batch, max_batches);
    drop(db);
    wait_for_release(path);
    result
}

fn upgrade_log(
    config: &SledStoreConfig,
    db: &sled::Db,
    per_batch: usize,
    max_batches: usize,
) -> Result<UpgradeSummary, StoreError> {
    let path = config.path.as_path();
    let log = db.open_tree("log").map_err(sled_error)?;
    let Some(found) = log.get(META_FORMAT).map_err(sled_error)? else {
        return Err(StoreError::NotAStore(path.display().to_string()));
    };
    let found = u32::from_be_bytes(
        found
            .as_ref()
            .try_into()
            .map_err(|_| corrupt("format version record"))?,
    );
    let head = stored_head(&log)?;
    let upgrading = log.contains_key(META_UPGRADING).map_err(sled_error)?;
    let mut summary = UpgradeSummary {
        found_format: found,
        events: head,
        chunks_written: 0,
    };
    match (found, upgrading) {
        (FORMAT_VERSION, false) => return Ok(summary),
        (FORMAT_VERSION, true) => summary.found_format = 2,
        // Format 3 differs only in writing every stream entry with its
        // group: all are there, so its index is complete up to the head.
        (3, false) => {
            ack_mark::check(path, head, config.accept_lost_events, "upgrading")?;
            mark_format(path, &log, head, false)?;
            return Ok(summary);
        }
        // The format-3 build's upgrade from format 2, interrupted: this
        // one finishes it.
        (3, true) => {
            summary.found_format = 2;
            mark_format(path, &log, head, true)?;
        }
        (2, _) => start(config, &log, head)?,
        (found, _) => {
            return Err(StoreError::FormatMismatch {
                found,
                expected: FORMAT_VERSION,
            })
        }
    }
    let mut batches = 0;
    loop {
        let next = last_position(&log)? + 1;
        let mut records = Vec::new();
        let mut batch = sled::Batch::default();
        for entry in log.scan_prefix([EVENT]).take(per_batch) {
            let (key, value) = entry.map_err(sled_error)?;
            let position = decode_u64(&key[1..])?;
            let expected = next + records.len() as u64;
            if position != expected {
                return Err(corrupt(format_args!(
                    "format-2 log: position {position} where {expected} was next"
                )));
            }
            batch.remove(key);
            records.push(value);
        }
        if records.is_empty() {
            break;
        }
        if batches == max_batches {
            return Ok(summary);
        }
        summary.chunks_written += stage_chunks(&mut batch, next, &records) as u64;
        log.apply_batch(batch).map_err(sled_error)?;
        batches += 1;
    }
    let last = last_position(&log)?;
    if last != head {
        return Err(corrupt(format_args!(
            "upgraded log ends at {last}, its stored head is {head}"
        )));
    }
    log.remove(META_UPGRADING).map_err(sled_error)?;
    db.flush().map_err(sled_error)?;
    Syncer::new(path, Durability::Fsync, Arc::new(Counters::default()))?.sync()?;
    Ok(summary)
}

/// Checks a format-2 log before anything moves (its `E` keys are exactly
/// positions 1..=head, no chunk is there yet, and sled recovered all it
/// acknowledged, or the config accepts the loss), then marks the store as
/// upgrading, durably. A refusal here leaves the store as it was, still
/// readable by the build that wrote it.
fn start(config: &SledStoreConfig, log: &sled::Tree, head: u64) -> Result<(), StoreError> {
    let path = config.path.as_path();
    let mut last = 0;
    for key in log.scan_prefix([EVENT]).keys() {
        let key = key.map_err(sled_error)?;
        let position = key.get(1..).map(decode_u64).transpose().ok().flatten();
        if position != Some(last + 1) {
            return Err(corrupt(format_args!(
                "format-2 log: {} after position {last}; `annals verify` with the build that \
                 wrote it tells more",
                match position {
                    Some(position) => format!("position {position}"),
                    None => format!("a malformed key of {} bytes", key.len()),
                }
            )));
        }
        last += 1;
    }
    if last != head {
        return Err(corrupt(format_args!(
            "stored head position {head} but last event at {last}"
        )));
    }
    if log
        .range(chunk_key(0)..=chunk_key(u64::MAX))
        .next()
        .is_some()
    {
        return Err(corrupt("a format-2 log that holds chunks"));
    }
    ack_mark::check(path, head, config.accept_lost_events, "upgrading")?;
    mark_format(path, log, head, true)
}

/// Writes this build's format, with the stream index complete up to
/// `head` (formats 2 and 3 write every stream entry with its group) and,
/// if `upgrading`, the marker of an upgrade under way, in one batch, made
/// durable before anything else changes.
fn mark_format(
    path: &Path,
    log: &sled::Tree,
    head: u64,
    upgrading: bool,
) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    batch.insert(META_FORMAT, &FORMAT_VERSION.to_be_bytes());
    batch.insert(META_INDEXED, &head.to_be_bytes());
    if upgrading {
        batch.insert(META_UPGRADING, &[1u8]);
    }
    log.apply_batch(batch).map_err(sled_error)?;
    log.flush().map_err(sled_error)?;
    Syncer::new(path, Durability::Fsync, Arc::new(Counters::default()))?.sync()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventFilter, Position, ReadDirection, StreamId, Version};
    use crate::store::{EventStore, ExpectedVersion, NewEvent};

    /// A copy of `tests/fixtures/format2`: a store written by the format-2
    /// build (`8a9c815`), and its events as that build read them.
    fn format2_store() -> (tempfile::TempDir, std::path::PathBuf, Vec<String>) {
        fixture_store("format2")
    }

    /// A copy of `tests/fixtures/<name>` (a store and its events as the
    /// build that wrote it read them).
    fn fixture_store(name: &str) -> (tempfile::TempDir, std::path::PathBuf, Vec<String>) {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        std::fs::create_dir_all(&path).unwrap();
        for entry in std::fs::read_dir(fixture.join("store")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), path.join(entry.file_name())).unwrap();
        }
        let events = std::fs::read_to_string(fixture.join("events.txt")).unwrap();
        (dir, path, events.lines().map(str::to_owned).collect())
    }

    fn format_of(path: &Path) -> u32 {
        let db = sled::open(path).unwrap();
        let found = db
            .open_tree("log")
            .unwrap()
            .get(META_FORMAT)
            .unwrap()
            .unwrap();
        let format = u32::from_be_bytes(found.as_ref().try_into().unwrap());
        drop(db);
        wait_for_release(path);
        format
    }

    fn refused_as_format_2(path: &Path) {
        match SledStore::open(path) {
            Err(StoreError::FormatMismatch { found, expected }) => {
                assert_eq!((found, expected), (2, FORMAT_VERSION));
            }
            other => panic!("expected FormatMismatch, got {:?}", other.map(|_| ())),
        }
    }

    /// Opens the upgraded store and checks that it reads exactly what the
    /// format-2 build read, by every read path, and takes new appends.
    async fn check_upgraded(path: &Path, expected: &[String]) {
        let store = SledStore::open(path).unwrap();
        let all = store
            .read_all(
                Position::START,
                ReadDirection::Forward,
                10_000,
                &EventFilter::All,
            )
            .await
            .unwrap();
        let read: Vec<String> = all.iter().map(|e| format!("{e:?}")).collect();
        assert_eq!(read, expected);
        let backward = store
            .read_all(
                Position::END,
                ReadDirection::Backward,
                10_000,
                &EventFilter::All,
            )
            .await
            .unwrap();
        assert!(backward.iter().rev().eq(all.iter()));
        for event in &all {
            let by_id = store.read_event(event.event_id).await.unwrap();
            assert_eq!(by_id.as_ref(), Some(event));
            let in_stream = store
                .read_stream(&event.stream_id, event.version, ReadDirection::Forward, 1)
                .await
                .unwrap();
            assert_eq!(in_stream.first(), Some(event));
        }
        let order_1 = StreamId::new("order-1").unwrap();
        let snapshot = store.load_snapshot(&order_1).await.unwrap().unwrap();
        assert_eq!(
            (snapshot.version, &snapshot.payload[..]),
            (Version(3), &b"state at 3"[..])
        );
        assert_eq!(
            store.load_checkpoint("status").await.unwrap(),
            Some(Position(100))
        );
        let version = store.stream_version(&order_1).await.unwrap();
        let appended = store
            .append(
                &order_1,
                ExpectedVersion::Exact(version),
                vec![NewEvent::new("Changed", b"after".to_vec())],
            )
            .await
            .unwrap();
        assert_eq!(appended.first_position, Position(all.len() as u64 + 1));
        assert_eq!(appended.first_version, Version(version.0 + 1));
        // A retry of an event stored before the upgrade is still recognised.
        let old = &all[0];
        let retry = NewEvent::new(old.event_type.clone(), old.payload.clone())
            .with_id(old.event_id)
            .with_schema_version(old.schema_version)
            .with_metadata(old.metadata.clone());
        let retried = store
            .append(&old.stream_id, ExpectedVersion::Any, vec![retry])
            .await
            .unwrap();
        assert_eq!(retried.first_position, old.position);
        store.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_format_2_store_is_refused_then_upgraded_in_place() {
        let (_dir, path, expected) = format2_store();
        assert_eq!(expected.len(), 500);
        refused_as_format_2(&path);
        let summary = SledStore::upgrade(&path).unwrap();
        assert_eq!(summary.found_format, 2);
        assert_eq!(summary.events, 500);
        assert!(summary.chunks_written >= 1 && summary.chunks_written < 500);
        check_upgraded(&path, &expected).await;
        // Again: nothing to do.
        let again = SledStore::upgrade(&path).unwrap();
        assert_eq!(
            (again.found_format, again.chunks_written),
            (FORMAT_VERSION, 0)
        );
    }

    /// Each batch of the upgrade is atomic, so an upgrade killed between
    /// two leaves a store that no build reads and that the next run
    /// finishes.
    #[tokio::test]
    async fn an_interrupted_upgrade_is_refused_until_a_second_run_finishes_it() {
        let (_dir, path, expected) = format2_store();
        for stop_after in [0, 3] {
            let partial = upgrade(&SledStoreConfig::new(&path), 64, stop_after).unwrap();
            assert_eq!(partial.found_format, 2);
            // This build refuses it, and so does the format-2 build, which
            // finds this build's format.
            refused_as_format_2(&path);
            assert_eq!(format_of(&path), FORMAT_VERSION);
        }
        let finished = SledStore::upgrade(&path).unwrap();
        assert_eq!(finished.found_format, 2);
        check_upgraded(&path, &expected).await;
    }

    #[tokio::test]
    async fn an_upgrade_refuses_what_is_not_a_format_2_store() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("nothing");
        assert!(matches!(
            SledStore::upgrade(&empty),
            Err(StoreError::NotAStore(_))
        ));
        assert!(!empty.exists());
        let (_fixture, path, _) = format2_store();
        {
            let db = sled::open(&path).unwrap();
            let log = db.open_tree("log").unwrap();
            log.insert(META_FORMAT, &1u32.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        wait_for_release(&path);
        assert!(matches!(
            SledStore::upgrade(&path),
            Err(StoreError::FormatMismatch { found: 1, .. })
        ));
        let (_fixture, gap, _) = format2_store();
        {
            let db = sled::open(&gap).unwrap();
            let log = db.open_tree("log").unwrap();
            let mut key = vec![EVENT];
            key.extend_from_slice(&250u64.to_be_bytes());
            log.remove(key).unwrap();
            db.flush().unwrap();
        }
        wait_for_release(&gap);
        let refused = SledStore::upgrade(&gap);
        assert!(
            matches!(refused, Err(StoreError::Corrupt(_))),
            "{refused:?}"
        );
        // Refused before anything changed: still format 2, not marked as
        // upgrading, every record in place.
        assert_eq!(format_of(&gap), 2);
        let db = sled::open(&gap).unwrap();
        let log = db.open_tree("log").unwrap();
        assert!(!log.contains_key(META_UPGRADING).unwrap());
        assert_eq!(log.scan_prefix([EVENT]).count(), 499);
        drop((log, db));
        wait_for_release(&gap);
        refused_as_format_2(&gap);
    }

    #[tokio::test]
    async fn a_store_shorter_than_acknowledged_is_upgraded_only_when_the_loss_is_accepted() {
        let (_dir, path, expected) = format2_store();
        // The mark says 600 were acknowledged; the log holds 500.
        ack_mark::AckMark::open(&path, 500)
            .unwrap()
            .record_durably(600)
            .unwrap();
        let refused = SledStore::upgrade(&path);
        assert!(
            matches!(
                refused,
                Err(StoreError::ShorterThanAcknowledged { acknowledged, recovered })
                    if (acknowledged, recovered) == (Position(600), Position(500))
            ),
            "{refused:?}"
        );
        assert_eq!(format_of(&path), 2);
        let config = SledStoreConfig::new(&path).accept_lost_events(true);
        assert_eq!(SledStore::upgrade_with(&config).unwrap().events, 500);
        // The mark now says 500: a plain open succeeds.
        check_upgraded(&path, &expected).await;
    }

    /// A store written by the format-3 build (`07eb41d`) is refused with
    /// its format; the upgrade marks it (no chunk moves) and this build
    /// reads every event, stream, snapshot and checkpoint as that build did.
    #[tokio::test]
    async fn a_store_of_the_format_3_build_is_upgraded_by_marking_it() {
        let (_dir, path, expected) = fixture_store("format3");
        assert_eq!(format_of(&path), 3);
        match SledStore::open(&path) {
            Err(StoreError::FormatMismatch { found, expected }) => {
                assert_eq!((found, expected), (3, FORMAT_VERSION));
            }
            other => panic!("expected FormatMismatch, got {:?}", other.map(|_| ())),
        }
        wait_for_release(&path);
        let summary = SledStore::upgrade(&path).unwrap();
        assert_eq!((summary.found_format, summary.events), (3, 500));
        assert_eq!(summary.chunks_written, 0);
        assert_eq!(format_of(&path), FORMAT_VERSION);
        check_upgraded(&path, &expected).await;
    }
}
