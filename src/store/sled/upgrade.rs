//! The in-place upgrade of a format-2, 3 or 4 store to this build's format
//! (docs/design.md, "Upgrading a store of an earlier format"). From format
//! 2, each event's `E` record moves, byte for byte, into chunks, batch by
//! batch, each batch one atomic sled batch, so that a killed upgrade
//! leaves a store that running the upgrade again finishes. From every
//! earlier format, the one-key-per-event id index (`I + id`) becomes the
//! first run of the id index (`id_index.rs`), then its keys are removed.

use std::path::Path;
use std::sync::Arc;

use super::durability::Syncer;
use super::format::{
    chunk_key, corrupt, decode_u64, last_position, stage_chunks, stored_head, EVENT, EVENT_ID,
    FORMAT_VERSION, META_FORMAT, META_HEAD, META_INDEXED, META_RUNS, META_UPGRADING,
};
use super::id_index::IdRuns;
use super::{
    ack_mark, check_path, open_db, settle_head, sled_error, wait_for_release, Counters, Durability,
};
use super::{SledStore, SledStoreConfig};
use crate::error::StoreError;

/// Events moved per sled batch.
pub(super) const EVENTS_PER_BATCH: usize = 4096;

/// What [`SledStore::upgrade`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct UpgradeSummary {
    /// The format the store had when this call found it (for an upgrade
    /// this call finished, the format it started from): 2, 3 or 4, or
    /// [`FORMAT_VERSION`] when it was already upgraded (then nothing was
    /// written).
    pub found_format: u32,
    /// The events the store holds.
    pub events: u64,
    /// The chunks this call wrote.
    pub chunks_written: u64,
}

impl SledStore {
    /// Upgrades the format-2, 3 or 4 store at `path` to
    /// [`FORMAT_VERSION`] in place, or finishes an upgrade that was
    /// interrupted; a store already at this format is left as it is.
    /// Blocking (call it from `spawn_blocking` in async code): it rewrites
    /// the id index (about 24 bytes per event), and from format 2 it also
    /// reads and rewrites every event. Positions,
    /// versions, ids, timestamps, metadata and payloads are kept byte for
    /// byte; snapshots and checkpoints are not touched. The result is
    /// flushed and fdatasynced before this returns.
    ///
    /// While an upgrade is under way (or after it was killed), opening the
    /// store is refused, by this build with `FormatMismatch` of the format
    /// it upgrades from, and by an older build with a `FormatMismatch` of
    /// this format: no build ever reads a half-upgraded log.
    ///
    /// # Errors
    /// [`StoreError::InUse`] when a store has the directory open;
    /// [`StoreError::NotAStore`]; [`StoreError::FormatMismatch`] for a
    /// format other than 2, 3, 4 or this one; [`StoreError::ShorterThanAcknowledged`]
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
    let mut head = stored_head(&log)?;
    let upgrading = upgrading_from(&log)?;
    let mut summary = UpgradeSummary {
        found_format: found,
        events: head,
        chunks_written: 0,
    };
    match (found, upgrading) {
        (FORMAT_VERSION, None) => return Ok(summary),
        // This build's upgrade, interrupted: finished below.
        (FORMAT_VERSION, Some(from)) => summary.found_format = from,
        // Formats 3 and 4 differ in their id index (and format 3 in
        // writing every stream entry with its group: `Mindexed` = its head).
        // Format 4's `Mindexed` stays: the tail after it is rebuilt from
        // the log on open, as format 4's was.
        (3 | 4, None) => {
            let indexed = (found == 3).then_some(head);
            // A head past the last event goes back to it as on opening;
            // what the indexes hold past it is cut back (the id keys here,
            // the rest by the first open, which finds `Mindexed` past it).
            let last = settle_head(path, &log, head, config.accept_lost_events, "upgrading")?;
            // The mark against the log (after a torn group `settle_head`
            // already checked it, and this finds it settled).
            ack_mark::check(path, last, config.accept_lost_events, "upgrading")?;
            mark_format(path, &log, indexed, found, (last < head).then_some(last))?;
            head = last;
            summary.events = last;
        }
        // A format-3 or 4 build's upgrade from format 2, interrupted: this
        // one finishes it.
        (3 | 4, Some(_)) => {
            summary.found_format = 2;
            mark_format(path, &log, Some(head), 2, None)?;
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
    if !convert_id_index(&log, head, per_batch, max_batches - batches)? {
        return Ok(summary);
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
    mark_format(path, log, Some(head), 2, None)
}

/// The format an upgrade under way started from: `Mupgrading` holds it
/// (a format-3 or 4 build wrote `[1]`, upgrading from format 2).
pub(super) fn upgrading_from(log: &sled::Tree) -> Result<Option<u32>, StoreError> {
    let Some(value) = log.get(META_UPGRADING).map_err(sled_error)? else {
        return Ok(None);
    };
    let from = match value.as_ref() {
        [1] => 2,
        bytes => bytes.try_into().map(u32::from_be_bytes).unwrap_or(0),
    };
    // Only the formats this build upgrades from were ever written there.
    if (2..FORMAT_VERSION).contains(&from) {
        Ok(Some(from))
    } else {
        Err(corrupt(format_args!(
            "the upgrade marker holds {:?}, not a format this build upgrades from",
            value.as_ref()
        )))
    }
}

/// Turns the earlier formats' id index, one `I + id` key per event, into
/// the first run of this format's: the run, and `Mruns` naming it, then
/// the `I` keys removed, `per_batch` to a sled batch. Run again after a
/// kill: before `Mruns` is written the run is garbage that opening the
/// runs removes; after, only the removal is left. False when it stopped
/// (as a kill would) before the removal's batch number `max_batches`.
fn convert_id_index(
    log: &sled::Tree,
    head: u64,
    per_batch: usize,
    max_batches: usize,
) -> Result<bool, StoreError> {
    if !log.contains_key(META_RUNS).map_err(sled_error)? {
        let runs = IdRuns::open(log)?;
        let entries = log
            .scan_prefix([EVENT_ID])
            .map(|entry| {
                let (key, value) = entry.map_err(sled_error)?;
                let id = key
                    .get(1..)
                    .and_then(|b| <[u8; 16]>::try_from(b).ok())
                    .ok_or_else(|| corrupt(format_args!("an id key of {} bytes", key.len())))?;
                Ok((u128::from_be_bytes(id), decode_u64(&value)?))
            })
            // Entries of a group torn past the head point at nothing.
            .filter(|entry| {
                entry
                    .as_ref()
                    .map_or(true, |&(_, position)| position <= head)
            });
        runs.add_sorted(log, entries, head)?;
    }
    let mut batches = 0;
    loop {
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        for key in log.scan_prefix([EVENT_ID]).keys().take(per_batch) {
            batch.remove(key.map_err(sled_error)?);
            removed += 1;
        }
        if removed == 0 {
            return Ok(true);
        }
        if batches == max_batches {
            return Ok(false);
        }
        log.apply_batch(batch).map_err(sled_error)?;
        batches += 1;
    }
}

/// Writes this build's format, with the stream index complete up to
/// `indexed` when given (formats 2 and 3 write every stream entry with its
/// group), the head when given, and the marker of an upgrade under way
/// from format `from`, in one batch, made durable before anything else
/// changes.
fn mark_format(
    path: &Path,
    log: &sled::Tree,
    indexed: Option<u64>,
    from: u32,
    head: Option<u64>,
) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    batch.insert(META_FORMAT, &FORMAT_VERSION.to_be_bytes());
    if let Some(head) = head {
        batch.insert(META_HEAD, &head.to_be_bytes());
    }
    if let Some(indexed) = indexed {
        batch.insert(META_INDEXED, &indexed.to_be_bytes());
    }
    batch.insert(META_UPGRADING, &from.to_be_bytes());
    log.apply_batch(batch).map_err(sled_error)?;
    log.flush().map_err(sled_error)?;
    Syncer::new(path, Durability::Fsync, Arc::new(Counters::default()))?.sync()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventFilter, Position, ReadDirection, RecordedEvent, StreamId, Version};
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

    /// Every event of `store`, and each one's `Debug` line, as the
    /// fixtures' `events.txt` holds them.
    async fn whole_log_as_lines(store: &SledStore) -> (Vec<RecordedEvent>, Vec<String>) {
        let all = store
            .read_all(
                Position::START,
                ReadDirection::Forward,
                10_000,
                &EventFilter::All,
            )
            .await
            .unwrap();
        let lines = all.iter().map(|e| format!("{e:?}")).collect();
        (all, lines)
    }

    /// Opens the upgraded store and checks that it reads exactly what the
    /// format-2 build read, by every read path, and takes new appends.
    async fn check_upgraded(path: &Path, expected: &[String]) {
        let store = SledStore::open(path).unwrap();
        let (all, read) = whole_log_as_lines(&store).await;
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

    fn refused_as(path: &Path, format: u32) {
        match SledStore::open(path) {
            Err(StoreError::FormatMismatch { found, expected }) => {
                assert_eq!((found, expected), (format, FORMAT_VERSION));
            }
            other => panic!("expected FormatMismatch, got {:?}", other.map(|_| ())),
        }
        wait_for_release(path);
    }

    #[test]
    fn an_upgrade_marker_naming_no_earlier_format_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let log = sled::open(dir.path()).unwrap().open_tree("log").unwrap();
        assert_eq!(upgrading_from(&log).unwrap(), None);
        for (marker, from) in [
            (vec![1], 2),
            (2u32.to_be_bytes().to_vec(), 2),
            (4u32.to_be_bytes().to_vec(), 4),
        ] {
            log.insert(META_UPGRADING, marker).unwrap();
            assert_eq!(upgrading_from(&log).unwrap(), Some(from));
        }
        for marker in [
            vec![9],
            FORMAT_VERSION.to_be_bytes().to_vec(),
            9u32.to_be_bytes().to_vec(),
            vec![0; 5],
        ] {
            log.insert(META_UPGRADING, marker.clone()).unwrap();
            assert!(
                matches!(upgrading_from(&log), Err(StoreError::Corrupt(_))),
                "{marker:?}"
            );
        }
    }

    /// The `I` keys left, and the runs `Mruns` lists, of the store at `path`.
    fn id_keys_and_runs(path: &Path) -> (usize, usize) {
        let db = sled::open(path).unwrap();
        let log = db.open_tree("log").unwrap();
        let ids = log.scan_prefix([EVENT_ID]).count();
        let runs = super::super::id_index::stored_runs(&log).unwrap().0.len();
        drop(log);
        drop(db);
        wait_for_release(path);
        (ids, runs)
    }

    /// A store written by the format-3 build (`07eb41d`) or the format-4
    /// build (`ded12d8`) is refused with its format; the upgrade moves no
    /// chunk, turns the id keys into one run, and this build reads every
    /// event, stream, id, snapshot and checkpoint as that build did.
    #[tokio::test]
    async fn stores_of_the_format_3_and_4_builds_are_upgraded_without_moving_events() {
        for format in [3, 4] {
            let (_dir, path, expected) = fixture_store(&format!("format{format}"));
            assert_eq!(format_of(&path), format);
            assert_eq!(id_keys_and_runs(&path), (500, 0));
            refused_as(&path, format);
            let summary = SledStore::upgrade(&path).unwrap();
            assert_eq!((summary.found_format, summary.events), (format, 500));
            assert_eq!(summary.chunks_written, 0);
            assert_eq!(format_of(&path), FORMAT_VERSION);
            assert_eq!(id_keys_and_runs(&path), (0, 1));
            check_upgraded(&path, &expected).await;
        }
    }

    /// A format-4 store whose stored head is past its last chunk (sled 0.34
    /// can recover a torn group's `Mhead` without its chunk) is refused
    /// unchanged while its mark says those events were acknowledged; with
    /// the loss accepted it is upgraded at its last event, and neither
    /// index points past it.
    #[tokio::test]
    async fn a_format_4_store_whose_head_is_past_its_last_event_is_upgraded_at_it() {
        let (_dir, path, expected) = fixture_store("format4");
        let last = {
            let db = sled::open(&path).unwrap();
            let log = db.open_tree("log").unwrap();
            let (key, _) = log.scan_prefix([b'C']).next_back().unwrap().unwrap();
            log.remove(key).unwrap();
            let last = last_position(&log).unwrap();
            db.flush().unwrap();
            drop(log);
            drop(db);
            wait_for_release(&path);
            last
        };
        assert!(last < 500);
        assert!(matches!(
            SledStore::upgrade(&path),
            Err(StoreError::ShorterThanAcknowledged { .. })
        ));
        assert_eq!(format_of(&path), 4);
        let config = SledStoreConfig::new(&path).accept_lost_events(true);
        let summary = SledStore::upgrade_with(&config).unwrap();
        assert_eq!((summary.found_format, summary.events), (4, last));
        let store = SledStore::open(&path).unwrap();
        assert_eq!(store.head_position(), Position(last));
        let (_, read) = whole_log_as_lines(&store).await;
        assert_eq!(read, expected[..last as usize]);
        // The lost events' ids are found nowhere, and can be stored again.
        let lost: Vec<uuid::Uuid> = expected[last as usize..]
            .iter()
            .map(|line| {
                let at = line.find("event_id: ").unwrap() + "event_id: ".len();
                line[at..at + 36].parse().unwrap()
            })
            .collect();
        assert!(!lost.is_empty());
        for id in &lost {
            assert_eq!(store.read_event(*id).await.unwrap(), None);
        }
        let again = store
            .append(
                &StreamId::new("order-1").unwrap(),
                ExpectedVersion::Any,
                vec![NewEvent::new("Changed", b"again".to_vec()).with_id(lost[0])],
            )
            .await
            .unwrap();
        assert_eq!(again.first_position, Position(last + 1));
        let report = crate::ops::verify(&store).await.unwrap();
        assert!(report.is_sound(), "{:?}", report.violations);
        store.shutdown().await.unwrap();
    }

    /// Killed while it removes the id keys (after their run is listed),
    /// the upgrade leaves a store both builds refuse, which the next run
    /// finishes.
    #[tokio::test]
    async fn an_upgrade_killed_while_it_converts_the_id_index_is_finished_by_the_next() {
        let (_dir, path, expected) = fixture_store("format4");
        for stop_after in [0, 3] {
            let partial = upgrade(&SledStoreConfig::new(&path), 64, stop_after).unwrap();
            assert_eq!(partial.found_format, 4);
            assert_eq!(format_of(&path), FORMAT_VERSION);
            let (ids, runs) = id_keys_and_runs(&path);
            assert_eq!((ids, runs), (500 - 64 * stop_after, 1));
            refused_as(&path, 4);
        }
        let finished = SledStore::upgrade(&path).unwrap();
        assert_eq!(finished.found_format, 4);
        assert_eq!(id_keys_and_runs(&path), (0, 1));
        check_upgraded(&path, &expected).await;
    }
}
