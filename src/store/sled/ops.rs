//! What the operations layer (`annals::ops`) needs of the sled store beyond
//! the [`EventStore`](crate::EventStore) contract: listing checkpoints and
//! snapshots, deleting a checkpoint, the size on disk, a raw check of the
//! `log` tree's indexes against its events (format 5, docs/design.md), and
//! an offline loader that writes imported events as they were recorded.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::durability::Syncer;
use super::format::{
    chunk_at, decode_record, decode_u64, encode_record, event_at, stage_chunks, stored_head, Chunk,
    RecordDecoder, StoredSnapshot, CHUNK, ID_BLOCK, META_HEAD, STREAM,
};
use super::id_index::block_entries;
use super::stream_index::{block_at, block_positions, stored_indexed, Due, StreamIndex};
use super::{check_format, check_path, open_db, sled_error, wait_for_release, Counters};
use super::{Durability, SledStore};
use crate::error::StoreError;
use crate::event::{Position, RecordedEvent};
use crate::store::bulk::{check_batch, BulkError};
use crate::store::validate_checkpoint_name;

/// Findings past this many are counted, not kept.
const MAX_FINDINGS: usize = 10_000;

/// One thing wrong in the `log` tree, as the raw check finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RawFinding {
    /// No event between these positions.
    PositionGap { after: u64, next: u64 },
    /// The stored head and the last event disagree.
    HeadMismatch { stored: u64, last: u64 },
    /// The record at this position does not decode.
    Undecodable { position: u64, error: String },
    /// The event at this position has no (or a wrong) entry in an index.
    NotIndexed {
        position: u64,
        index: &'static str,
        detail: String,
    },
    /// An index entry that points at no event, or at another one.
    BadIndexEntry {
        index: &'static str,
        key: String,
        detail: String,
    },
}

/// What the raw check saw.
#[derive(Debug, Default)]
pub(crate) struct RawCheck {
    pub(crate) events: u64,
    pub(crate) index_entries: u64,
    pub(crate) findings: Vec<RawFinding>,
    /// Findings beyond [`MAX_FINDINGS`], counted only.
    pub(crate) more_findings: u64,
}

impl RawCheck {
    fn found(&mut self, finding: RawFinding) {
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(finding);
        } else {
            self.more_findings += 1;
        }
    }
}

/// A snapshot record: its stream, and its version or why it does not decode.
pub(crate) type RawSnapshot = (String, Result<u64, String>);

impl SledStore {
    /// Every saved checkpoint, by name.
    pub(crate) fn ops_checkpoints(&self) -> Result<Vec<(String, Position)>, StoreError> {
        self.with_handles(|handles| {
            let mut checkpoints = Vec::new();
            for entry in handles.checkpoints.iter() {
                let (key, value) = entry.map_err(sled_error)?;
                let name = String::from_utf8_lossy(&key).into_owned();
                checkpoints.push((name, Position(decode_u64(&value)?)));
            }
            Ok(checkpoints)
        })
    }

    /// Every snapshot record, by stream.
    pub(crate) fn ops_snapshots(&self) -> Result<Vec<RawSnapshot>, StoreError> {
        self.with_handles(|handles| {
            let mut snapshots = Vec::new();
            for entry in handles.snapshots.iter() {
                let (key, value) = entry.map_err(sled_error)?;
                let stream = String::from_utf8_lossy(&key).into_owned();
                let version = postcard::from_bytes::<StoredSnapshot<'_>>(&value)
                    .map(|stored| stored.version)
                    .map_err(|e| e.to_string());
                snapshots.push((stream, version));
            }
            Ok(snapshots)
        })
    }

    /// Deletes a checkpoint, durably; whether there was one.
    pub(crate) async fn ops_delete_checkpoint(&self, name: &str) -> Result<bool, StoreError> {
        validate_checkpoint_name(name)?;
        let removed = self.with_handles(|handles| {
            handles
                .checkpoints
                .remove(name)
                .map(|old| old.is_some())
                .map_err(sled_error)
        })?;
        self.sync().await?;
        Ok(removed)
    }

    /// The bytes of the store's directory.
    pub(crate) fn ops_size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(directory_size(&self.config.path)?)
    }

    /// Checks the `log` tree up to the acknowledged head: positions 1..head
    /// with no gap, every record decodes, every event has its stream and
    /// id index entries, and every index entry points at its event.
    pub(crate) fn ops_check_log(&self) -> Result<RawCheck, StoreError> {
        let head = self.feed.head().0;
        self.with_handles(|handles| check_log(&handles.log, head, Some(&handles.streams)))
    }
}

fn directory_size(path: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            directory_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// The raw check; without `index` (a bare tree in a test) only the log's
/// layout and the stream blocks.
fn check_log(
    log: &sled::Tree,
    head: u64,
    index: Option<&StreamIndex>,
) -> Result<RawCheck, StoreError> {
    let mut check = RawCheck::default();
    let stored_head = stored_head(log)?;
    let stream_indexed = stored_indexed(log)?;
    let mut last = 0;
    // After a chunk whose layout does not parse, its extent is unknown: the
    // next chunk's start is not reported as a gap.
    let mut extent_unknown = false;
    'chunks: for entry in log.scan_prefix([CHUNK]) {
        let (key, value) = entry.map_err(sled_error)?;
        let Ok(first) = decode_u64(&key[1..]) else {
            check.found(RawFinding::Undecodable {
                position: last + 1,
                error: format!("a chunk key of {} bytes", key.len()),
            });
            extent_unknown = true;
            continue;
        };
        if first > head {
            // A group the writer has applied and not yet acknowledged.
            break;
        }
        let chunk = match Chunk::parse(&key, value) {
            Ok(chunk) => chunk,
            Err(error) => {
                check.found(RawFinding::Undecodable {
                    position: first,
                    error: error.to_string(),
                });
                extent_unknown = true;
                continue;
            }
        };
        if first <= last {
            // Its events would be stored twice: the later chunk is not
            // read as theirs.
            check.found(RawFinding::Undecodable {
                position: first,
                error: format!("a chunk that overlaps the one before, which ends at {last}"),
            });
            continue;
        }
        if first != last + 1 && !std::mem::take(&mut extent_unknown) {
            check.found(RawFinding::PositionGap {
                after: last,
                next: first,
            });
        }
        for position in first..=chunk.last() {
            if position > head {
                break 'chunks;
            }
            last = position;
            check.events += 1;
            let record = chunk.record(position).expect("a position of the chunk");
            check_event(log, index, stream_indexed, position, record, &mut check)?;
        }
    }
    if stored_head != last || last != head {
        check.found(RawFinding::HeadMismatch {
            stored: stored_head,
            last,
        });
    }
    check_stream_index(log, head, &mut check)?;
    if let Some(index) = index {
        check_id_index(log, index, head, &mut check)?;
    }
    Ok(check)
}

/// Checks one stored event: its record decodes, and both indexes have its
/// entry pointing at it.
fn check_event(
    log: &sled::Tree,
    index: Option<&StreamIndex>,
    stream_indexed: u64,
    position: u64,
    value: &[u8],
    check: &mut RawCheck,
) -> Result<(), StoreError> {
    let record = match decode_record(position, value) {
        Ok(record) => record,
        Err(error) => {
            check.found(RawFinding::Undecodable {
                position,
                error: error.to_string(),
            });
            return Ok(());
        }
    };
    let Ok(stream) = std::str::from_utf8(record.stream) else {
        check.found(RawFinding::Undecodable {
            position,
            error: "the stream id is not UTF-8".into(),
        });
        return Ok(());
    };
    // Past `Mindexed`, the entry may still be in the tail of the store
    // that wrote it: not looked for.
    let indexed = (position <= stream_indexed).then(|| {
        block_at(log, stream, record.version).map(|block| {
            block.and_then(|(first, positions)| {
                positions.get((record.version - first) as usize).copied()
            })
        })
    });
    match indexed {
        None => {}
        Some(Ok(Some(p))) if p == position => {}
        Some(found) => check.found(RawFinding::NotIndexed {
            position,
            index: "stream",
            detail: format!(
                "{stream} version {}: index entry {}",
                record.version,
                describe(found)
            ),
        }),
    }
    // Through the live index: the tail holds the newest ids.
    let Some(index) = index else {
        return Ok(());
    };
    match index.event_position(log, record.event_id) {
        Ok(Some(p)) if p == position => {}
        found => check.found(RawFinding::NotIndexed {
            position,
            index: "event id",
            detail: format!("id {}: index entry {}", record.event_id, describe(found)),
        }),
    }
    Ok(())
}

fn describe(found: Result<Option<u64>, StoreError>) -> String {
    match found {
        Ok(Some(p)) => format!("points at position {p}"),
        Ok(None) => "is missing".into(),
        Err(e) => format!("does not decode: {e}"),
    }
}

/// The event stored at `position`, decoded, or why not.
fn indexed_event(log: &sled::Tree, position: u64) -> Result<Result<OwnedHead, String>, StoreError> {
    let chunk = match chunk_at(log, position) {
        Ok(Some(chunk)) => chunk,
        Ok(None) => {
            return Ok(Err(format!(
                "points at position {position}, which holds no event"
            )))
        }
        Err(StoreError::Corrupt(why)) => {
            return Ok(Err(format!(
                "points at position {position}, which does not decode: {why}"
            )))
        }
        Err(e) => return Err(e),
    };
    let bytes = chunk.record(position).expect("the chunk holds it");
    Ok(match decode_record(position, bytes) {
        Ok(record) => Ok(OwnedHead {
            stream: record.stream.to_vec(),
            version: record.version,
            event_id: record.event_id,
        }),
        Err(e) => Err(format!(
            "points at position {position}, which does not decode: {e}"
        )),
    })
}

struct OwnedHead {
    stream: Vec<u8>,
    version: u64,
    event_id: uuid::Uuid,
}

/// Checks every block of the stream index: each of its versions points at
/// the event of that stream and version.
fn check_stream_index(log: &sled::Tree, head: u64, check: &mut RawCheck) -> Result<(), StoreError> {
    for entry in log.scan_prefix([STREAM]) {
        let (key, value) = entry.map_err(sled_error)?;
        let body = &key[1..];
        let name = || String::from_utf8_lossy(body).replace('\0', "@");
        if body.len() < 9 || body[body.len() - 9] != 0 {
            check.index_entries += 1;
            check.found(RawFinding::BadIndexEntry {
                index: "stream",
                key: name(),
                detail: "malformed key".into(),
            });
            continue;
        }
        let stream = &body[..body.len() - 9];
        let first = decode_u64(&body[body.len() - 8..])?;
        let positions = match block_positions(&value) {
            Ok(positions) => positions,
            Err(e) => {
                check.index_entries += 1;
                check.found(RawFinding::BadIndexEntry {
                    index: "stream",
                    key: format!("{} version {first}", String::from_utf8_lossy(stream)),
                    detail: e.to_string(),
                });
                continue;
            }
        };
        for (version, position) in (first..).zip(positions) {
            check.index_entries += 1;
            if position > head {
                continue;
            }
            let problem = match indexed_event(log, position)? {
                Err(why) => Some(why),
                Ok(event) if event.stream != stream || event.version != version => Some(format!(
                    "points at position {position}, which holds {} version {}",
                    String::from_utf8_lossy(&event.stream),
                    event.version
                )),
                Ok(_) => None,
            };
            if let Some(detail) = problem {
                check.found(RawFinding::BadIndexEntry {
                    index: "stream",
                    key: format!("{} version {version}", String::from_utf8_lossy(stream)),
                    detail,
                });
            }
        }
    }
    Ok(())
}

/// Checks every run of the id index (while no merge swaps runs): each
/// block parses, ids increase through the run, each entry points at the
/// event with that id, and the run holds as many ids as it says.
fn check_id_index(
    log: &sled::Tree,
    index: &StreamIndex,
    head: u64,
    check: &mut RawCheck,
) -> Result<(), StoreError> {
    index.id_runs().without_merges(|runs| {
        // Entries between the acknowledged head and the stored one belong
        // to a group not yet answered; past the stored head, to nothing.
        let stored = stored_head(log)?;
        for &(run, count) in runs {
            let mut found = 0u64;
            let mut previous: Option<u128> = None;
            let bad = |check: &mut RawCheck, key: String, detail: String| {
                check.found(RawFinding::BadIndexEntry {
                    index: "event id",
                    key,
                    detail,
                });
            };
            let prefix = {
                let mut prefix = vec![ID_BLOCK];
                prefix.extend_from_slice(&run.to_be_bytes());
                prefix
            };
            for block in log.scan_prefix(&prefix) {
                let (key, value) = block.map_err(sled_error)?;
                let entries = match block_entries(&value) {
                    Ok(entries) => entries,
                    Err(e) => {
                        check.index_entries += 1;
                        bad(check, format!("run {run} block {key:?}"), e.to_string());
                        continue;
                    }
                };
                let first = key.get(9..).and_then(|b| <[u8; 16]>::try_from(b).ok());
                if first.map(u128::from_be_bytes) != entries.first().map(|&(id, _)| id) {
                    bad(
                        check,
                        format!("run {run} block {key:?}"),
                        "the block's key is not its first id".into(),
                    );
                }
                for (id, position) in entries {
                    check.index_entries += 1;
                    found += 1;
                    let id = uuid::Uuid::from_u128(id);
                    if previous.is_some_and(|previous| previous >= id.as_u128()) {
                        bad(check, id.to_string(), format!("out of order in run {run}"));
                    }
                    previous = Some(id.as_u128());
                    if position > stored {
                        bad(
                            check,
                            id.to_string(),
                            format!("points at position {position}, past the head {stored}"),
                        );
                        continue;
                    }
                    if position > head {
                        continue;
                    }
                    let problem = match indexed_event(log, position)? {
                        Err(why) => Some(why),
                        Ok(event) if event.event_id != id => Some(format!(
                            "points at position {position}, which holds event {}",
                            event.event_id
                        )),
                        Ok(_) => None,
                    };
                    if let Some(detail) = problem {
                        bad(check, id.to_string(), detail);
                    }
                }
            }
            if found != count {
                bad(
                    check,
                    format!("run {run}"),
                    format!("holds {found} ids, its summary says {count}"),
                );
            }
        }
        Ok(())
    })
}

/// Writes imported events into a sled store directory that no store has
/// open, each batch as one atomic sled batch, exactly as recorded
/// elsewhere. The writer thread of a [`SledStore`] owns every write to
/// the log while one is open (its next position and its cache of stream
/// heads live in it), so the loader holds sled itself, and with it the
/// directory's lock, instead.
#[derive(Debug)]
pub(crate) struct SledLoader {
    db: sled::Db,
    log: sled::Tree,
    path: PathBuf,
    head: u64,
    /// The indexes, written as a store's indexer writes them.
    index: StreamIndex,
}

impl SledLoader {
    /// Opens (creating it if need be) the store at `path` for loading.
    ///
    /// # Errors
    /// As [`SledStore::open`]: [`StoreError::InUse`] when a store has it
    /// open, [`StoreError::FormatMismatch`], [`StoreError::NotAStore`], ...
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        check_path(path)?;
        let config = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None);
        let db = open_db(path, &config)?;
        let log = db.open_tree("log").map_err(sled_error)?;
        db.open_tree("snapshots").map_err(sled_error)?;
        db.open_tree("checkpoints").map_err(sled_error)?;
        let head = check_format(path, &db, &log, false)?;
        let flush_every = super::SledStoreConfig::new(path).stream_index_flush_events;
        let index = StreamIndex::open(&log, head, flush_every)?;
        Ok(Self {
            db,
            log,
            path: path.to_path_buf(),
            head,
            index,
        })
    }

    /// The last position stored.
    pub(crate) fn head(&self) -> Position {
        Position(self.head)
    }

    /// The event at `position`, if stored.
    pub(crate) fn event_at(&self, position: Position) -> Result<Option<RecordedEvent>, StoreError> {
        event_at(&self.log, position.0, &mut RecordDecoder::default())
    }

    /// Writes `events`, which must continue the log at its head, as one
    /// atomic batch; nothing of it when any event is refused.
    pub(crate) fn load(&mut self, events: &[RecordedEvent]) -> Result<(), BulkError> {
        let mut stored = HashSet::new();
        for event in events {
            if self
                .index
                .event_position(&self.log, event.event_id)?
                .is_some()
            {
                stored.insert(event.event_id);
            }
        }
        let (log, index) = (&self.log, &self.index);
        check_batch(self.head, events, |stream| index.head(log, stream), &stored)?;
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Ok(());
        };
        let records = events
            .iter()
            .map(encode_record)
            .collect::<Result<Vec<_>, _>>()?;
        let mut batch = sled::Batch::default();
        stage_chunks(&mut batch, first.position.0, &records);
        batch.insert(META_HEAD, &last.position.0.to_be_bytes());
        self.log.apply_batch(batch).map_err(sled_error)?;
        self.head = last.position.0;
        // As the writer does after a group: the batch's entries go to the
        // indexes' tail, flushed once it is due (a crash before that leaves
        // them to the next open's rebuild).
        if self.index.record(events)? != Due::No {
            self.flush_index()?;
        }
        Ok(())
    }

    fn flush_index(&self) -> Result<(), StoreError> {
        self.index.flush(&self.log, false)?;
        self.index
            .merge(&self.log, &std::sync::atomic::AtomicBool::new(false), false)
    }

    /// Makes everything loaded durable (sled's flush, then the fdatasync and
    /// blob fsyncs the store does after every group commit) and releases
    /// the directory.
    pub(crate) fn finish(self) -> Result<(), StoreError> {
        self.flush_index()?;
        self.db.flush().map_err(sled_error)?;
        let counters = Arc::new(Counters::default());
        Syncer::new(&self.path, Durability::Fsync, counters)?.sync()?;
        let Self { db, log, path, .. } = self;
        drop(log);
        drop(db);
        wait_for_release(&path);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::tests::encode;
    use super::super::format::{chunk_key, encode_chunk};
    use super::*;

    /// `check_log` over a `log` tree holding `chunks` (key, value) and no
    /// index entries: the layout findings only, as (position, error).
    fn layout_findings(chunks: &[(Vec<u8>, Vec<u8>)], head: u64) -> (u64, Vec<RawFinding>) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = db.open_tree("log").unwrap();
        for (key, value) in chunks {
            log.insert(key.as_slice(), value.as_slice()).unwrap();
        }
        log.insert(META_HEAD, &head.to_be_bytes()).unwrap();
        let check = check_log(&log, head, None).unwrap();
        let layout = check
            .findings
            .into_iter()
            .filter(|f| {
                matches!(
                    f,
                    RawFinding::Undecodable { .. }
                        | RawFinding::PositionGap { .. }
                        | RawFinding::HeadMismatch { .. }
                )
            })
            .collect();
        (check.events, layout)
    }

    fn records(count: usize) -> Vec<u8> {
        encode_chunk(&vec![encode("order-1", "Placed"); count])
    }

    fn undecodable_at(findings: &[RawFinding]) -> Vec<(u64, String)> {
        findings
            .iter()
            .map(|f| match f {
                RawFinding::Undecodable { position, error } => (*position, error.clone()),
                other => panic!("unexpected finding {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_chunk_overlapping_the_one_before_is_a_finding_not_counted_twice() {
        let chunks = [
            (chunk_key(1).to_vec(), records(2)),
            (chunk_key(2).to_vec(), records(1)),
            (chunk_key(3).to_vec(), records(1)),
        ];
        let (events, findings) = layout_findings(&chunks, 3);
        assert_eq!(events, 3);
        let found = undecodable_at(&findings);
        assert_eq!(found.len(), 1, "{findings:?}");
        assert_eq!(found[0].0, 2);
        assert!(found[0].1.contains("overlaps"), "{}", found[0].1);
    }

    #[test]
    fn a_chunk_that_does_not_parse_is_a_finding_and_hides_no_gap() {
        let chunks = [
            (chunk_key(1).to_vec(), records(2)),
            (chunk_key(3).to_vec(), vec![0xff; 5]),
            (chunk_key(5).to_vec(), records(1)),
        ];
        let (events, findings) = layout_findings(&chunks, 5);
        assert_eq!(events, 3);
        // Its extent is unknown: no gap is reported after it.
        let found = undecodable_at(&findings);
        assert_eq!(found.len(), 1, "{findings:?}");
        assert_eq!(found[0].0, 3);
    }

    #[test]
    fn a_malformed_chunk_key_is_a_finding_not_an_abort() {
        let chunks = [
            (b"C\0\0\0".to_vec(), records(1)),
            (chunk_key(1).to_vec(), records(2)),
        ];
        let (events, findings) = layout_findings(&chunks, 2);
        assert_eq!(events, 2);
        let found = undecodable_at(&findings);
        assert_eq!(found.len(), 1, "{findings:?}");
        assert!(
            found[0].1.contains("chunk key of 4 bytes"),
            "{}",
            found[0].1
        );
    }
}
