//! The stream index, kept off the commit path (docs/design.md, "The stream
//! index, off the commit path"), and the tail of both indexes. A group
//! commit writes its chunks only; the stream entries and event ids of the
//! newest events live in memory (the *tail*) until an indexer thread
//! writes them in bulk: the stream entries as *blocks*, one sled key per
//! stream per flush, `S + stream + \0 + first version`, whose value is the
//! positions of that stream's consecutive versions from the first (8 bytes
//! each, big-endian), and the ids as a run of the id index
//! (`id_index.rs`). `Mindexed` is the last position whose entries are
//! written; opening rebuilds the tail from the log after it.
//!
//! sled's CPU per key was the ceiling of the commit path (two index keys
//! per event); a stream that takes several events between two flushes now
//! costs one key for all of them, written on another thread.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

use uuid::Uuid;

use super::format::{chunk_at, chunk_key, Chunk, META_INDEXED, STREAM};
use super::format::{corrupt, decode_record, decode_u64, record_utf8, stream_key, stream_prefix};
use super::id_index::{IdRuns, Pace};
use super::sled_error;
use crate::error::StoreError;
use crate::event::{RecordedEvent, StreamId};

/// The most versions one block holds (4 KiB of positions): a stream that
/// took more between two flushes gets several. A larger value would cost
/// every read of one version its whole parse, and past 128 KiB sled 0.34
/// writes the page to a blob file of its own.
const BLOCK_VERSIONS: usize = 512;

/// Who should flush the tail after a group was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    /// Nobody yet: the tail is below its flush size, or a flush is under way.
    No,
    /// The indexer thread: the tail reached its flush size.
    Indexer,
    /// The writer itself, unpaced: the tail holds eight flush sizes, so the
    /// indexer is far behind (or gone), and memory stays bounded.
    Writer,
}

/// One stream's consecutive versions from `first`, with their positions.
#[derive(Debug)]
pub(super) struct Run {
    pub(super) first: u64,
    pub(super) positions: Vec<u64>,
    /// Rebuilt from the log on open: blocks that a flush cut short by a
    /// crash wrote for these versions may be there, and the flush of this
    /// run removes them (its own block covers them).
    rebuilt: bool,
}

impl Run {
    fn last(&self) -> u64 {
        self.first + self.positions.len() as u64 - 1
    }
}

/// A tail being written to sled: its stream runs and its ids.
#[derive(Debug, Default)]
struct TailEntries {
    streams: HashMap<StreamId, Run>,
    /// One entry per event recorded: its length is the tail's size.
    ids: HashMap<Uuid, u64>,
}

#[derive(Debug, Default)]
struct Tail {
    /// Being written to sled by the indexer; read beside `current` until
    /// its blocks, its id run and `Mindexed` are written.
    flushing: Option<Arc<TailEntries>>,
    current: TailEntries,
    /// The last position recorded in `current` (or, when it is empty, in
    /// `flushing`, or the stored `Mindexed`).
    last: u64,
}

/// The stream index of one open store: its blocks in the `log` tree and
/// its tail in memory. Shared by the writer (which records committed
/// events), the readers and the indexer thread (which flushes).
#[derive(Debug)]
pub(super) struct StreamIndex {
    tail: RwLock<Tail>,
    /// Events the tail holds before a flush is due.
    flush_every: usize,
    /// One flush at a time (the indexer's, or the final one).
    flush: Mutex<()>,
    /// The event-id index's runs.
    ids: IdRuns,
}

impl StreamIndex {
    /// The index of a store whose log ends at `head`: its tail rebuilt from
    /// the events after `Mindexed` (absent: from the start).
    pub(super) fn open(
        log: &sled::Tree,
        head: u64,
        flush_every: usize,
    ) -> Result<Self, StoreError> {
        let mut indexed = stored_indexed(log)?;
        let ids = IdRuns::open(log)?;
        if indexed > head {
            // Only a loss the store was told to accept (or a damaged mark)
            // leaves the log shorter than its index: drop what points past
            // the head before new events take those positions.
            tracing::warn!(
                indexed,
                head,
                "the stream index runs past the last event; cutting it back"
            );
            cut_back(log, head)?;
            // The runs, then `Mindexed` with their list in one batch: a
            // crash before it leaves `Mindexed` past the head, and the next
            // open cuts both back again.
            ids.cut_back(log, head)?;
            indexed = head;
        }
        let index = Self {
            tail: RwLock::new(Tail {
                last: indexed,
                ..Tail::default()
            }),
            flush_every,
            flush: Mutex::new(()),
            ids,
        };
        if indexed < head {
            let start = chunk_at(log, indexed + 1)?.map_or(indexed + 1, |chunk| chunk.first());
            let mut tail = index.write_tail();
            for entry in log.range(chunk_key(start)..=chunk_key(head)) {
                let (key, value) = entry.map_err(sled_error)?;
                let chunk = Chunk::parse(&key, value)?;
                for position in chunk.first().max(indexed + 1)..=chunk.last().min(head) {
                    let bytes = chunk.record(position).expect("a position of the chunk");
                    let record = decode_record(position, bytes)?;
                    let stream =
                        StreamId::new(record_utf8(position, record.stream)?).map_err(corrupt)?;
                    push(
                        &mut tail,
                        (&stream, record.version),
                        record.event_id,
                        position,
                        true,
                    )?;
                }
            }
        }
        Ok(index)
    }

    fn write_tail(&self) -> std::sync::RwLockWriteGuard<'_, Tail> {
        // Nothing panics while the lock is held.
        self.tail.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read_tail(&self) -> std::sync::RwLockReadGuard<'_, Tail> {
        self.tail.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a durable group's events, in position order, and says who
    /// should flush the tail now, if anyone.
    pub(super) fn record(&self, events: &[RecordedEvent]) -> Result<Due, StoreError> {
        let mut tail = self.write_tail();
        for event in events {
            push(
                &mut tail,
                (&event.stream_id, event.version.0),
                event.event_id,
                event.position.0,
                false,
            )?;
        }
        Ok(
            if tail.current.ids.len() >= self.flush_every.saturating_mul(8) {
                Due::Writer
            } else if tail.current.ids.len() >= self.flush_every && tail.flushing.is_none() {
                Due::Indexer
            } else {
                Due::No
            },
        )
    }

    /// Whether the tail that grows beside a flush is already due one: the
    /// flush then runs without pauses.
    fn behind(&self) -> bool {
        self.read_tail().current.ids.len() >= self.flush_every
    }

    /// The indexer's flush, paced, if the tail is (still) due one: a merge
    /// may have flushed it since the wake.
    pub(super) fn flush_if_due(&self, log: &sled::Tree) -> Result<(), StoreError> {
        if self.behind() {
            self.flush(log, true)?;
        }
        Ok(())
    }

    /// Writes the tail's stream entries as blocks, then its ids as a run
    /// with `Mindexed` (`IdRuns::add`), then forgets them. Blocks are plain inserts (sled's batch would hold its global
    /// write lock, and with it the writer, for the whole flush): a crash
    /// part-way leaves some blocks written and `Mindexed` behind them; the
    /// open after it rebuilds the tail from `Mindexed`, whose flush writes
    /// each stream's block under the same first version again and removes
    /// the blocks inside it. Until then the tail covers those versions and
    /// reads take them from the tail.
    ///
    /// `paced`: the indexer thread's flush pauses between blocks (see
    /// [`PACE_EVERY_BLOCKS`]); one that something waits for does not.
    pub(super) fn flush(&self, log: &sled::Tree, paced: bool) -> Result<(), StoreError> {
        let _one = self.flush.lock().unwrap_or_else(|p| p.into_inner());
        let (entries, last) = {
            let mut tail = self.write_tail();
            if tail.flushing.is_some() {
                // Only a flush that failed leaves its entries there (the
                // store is poisoned then): taking the next tail aside would
                // drop them, and `Mindexed` would then pass them for good.
                return Err(StoreError::Poisoned(
                    "an earlier flush of the store's indexes failed".into(),
                ));
            }
            if tail.current.ids.is_empty() {
                return Ok(());
            }
            let entries = Arc::new(std::mem::take(&mut tail.current));
            tail.flushing = Some(Arc::clone(&entries));
            (entries, tail.last)
        };
        // One pace for the whole flush: its stream blocks, then its id run.
        let behind = || self.behind();
        let mut pace = Pace::new(paced, &behind);
        for (stream, run) in &entries.streams {
            if run.rebuilt {
                // Blocks of an earlier flush of these versions, cut short:
                // this run's blocks replace them.
                let stale = log.range((
                    std::ops::Bound::Excluded(stream_key(stream.as_str(), run.first)),
                    std::ops::Bound::Included(stream_key(stream.as_str(), run.last())),
                ));
                for key in stale.keys() {
                    log.remove(key.map_err(sled_error)?).map_err(sled_error)?;
                }
            }
            for (first, positions) in (run.first..)
                .step_by(BLOCK_VERSIONS)
                .zip(run.positions.chunks(BLOCK_VERSIONS))
            {
                let mut value = Vec::with_capacity(positions.len() * 8);
                for position in positions {
                    value.extend_from_slice(&position.to_be_bytes());
                }
                log.insert(stream_key(stream.as_str(), first), value)
                    .map_err(sled_error)?;
                pace.block_written()?;
            }
        }
        let mut ids: Vec<(u128, u64)> = entries
            .ids
            .iter()
            .map(|(id, &position)| (id.as_u128(), position))
            .collect();
        ids.sort_unstable();
        // The run, then `Mruns` and `Mindexed` in one batch.
        self.ids.add(log, &ids, last, &mut pace)?;
        self.write_tail().flushing = None;
        Ok(())
    }

    /// Merges the id index's runs where four share a size (the indexer's
    /// work after a flush); returns early once `stop` is set. A tail that
    /// comes due meanwhile is flushed between two of the merge's blocks, so
    /// that a long merge does not leave the writer to flush it.
    pub(super) fn merge(
        &self,
        log: &sled::Tree,
        stop: &AtomicBool,
        paced: bool,
    ) -> Result<(), StoreError> {
        let behind = || self.behind();
        let flush = || self.flush(log, paced);
        let mut pace = Pace::new(paced, &behind);
        pace.flush_when_behind(&flush);
        self.ids.merge(log, stop, &mut pace)
    }

    /// The position of the event whose id is `id`, if stored: the tail's
    /// entry, or the runs'.
    pub(super) fn event_position(
        &self,
        log: &sled::Tree,
        id: Uuid,
    ) -> Result<Option<u64>, StoreError> {
        {
            let tail = self.read_tail();
            let in_tail = tail.current.ids.get(&id).or_else(|| {
                tail.flushing
                    .as_ref()
                    .and_then(|flushing| flushing.ids.get(&id))
            });
            if let Some(&position) = in_tail {
                return Ok(Some(position));
            }
        }
        // After the tail: a flush adds its run before it lets go of its
        // entries.
        self.ids.find(log, id)
    }

    /// The id index's runs.
    pub(super) fn id_runs(&self) -> &IdRuns {
        &self.ids
    }

    /// Runs `f` on the tail's runs of `stream` (none, one, or the flushing
    /// one and the current one, in version order), under the tail's lock.
    fn with_runs<T>(&self, stream: &StreamId, f: impl FnOnce(&[&Run]) -> T) -> T {
        let tail = self.read_tail();
        let flushing = tail.flushing.as_ref().and_then(|f| f.streams.get(stream));
        match (flushing, tail.current.streams.get(stream)) {
            (Some(old), Some(new)) => f(&[old, new]),
            (Some(run), None) | (None, Some(run)) => f(&[run]),
            (None, None) => f(&[]),
        }
    }

    /// The version of `stream`'s last event (0 when it has none).
    pub(super) fn head(&self, log: &sled::Tree, stream: &StreamId) -> Result<u64, StoreError> {
        match self.with_runs(stream, |runs| runs.last().map(|run| run.last())) {
            Some(version) => Ok(version),
            None => blocks_head(log, stream.as_str()),
        }
    }

    /// `stream`'s entries `(version, position)` from version `from` in
    /// `direction`, lazily, the tail's after the blocks'.
    pub(super) fn entries<'a>(
        &self,
        log: &'a sled::Tree,
        stream: &StreamId,
        from: u64,
        forward: bool,
    ) -> Entries<'a> {
        // The tail first, then the blocks: a flush that ends in between has
        // written its blocks before it let go of its runs.
        let (below, tail) = self.with_runs(stream, |runs| {
            let below = runs.first().map_or(u64::MAX, |run| run.first);
            let entries = runs
                .iter()
                .flat_map(|run| (run.first..).zip(run.positions.iter().copied()));
            let tail: Vec<(u64, u64)> = if forward {
                entries.filter(|&(version, _)| version >= from).collect()
            } else {
                let mut tail: Vec<_> = entries.filter(|&(version, _)| version <= from).collect();
                tail.reverse();
                tail
            };
            (below, tail)
        });
        Entries {
            log,
            prefix: stream_prefix(stream.as_str()),
            from,
            forward,
            below,
            tail: tail.into_iter(),
            phase: if forward { Phase::Blocks } else { Phase::Tail },
            block: Vec::new(),
            last_key: None,
            last_given: None,
        }
    }

    /// The position of `stream`'s event at `version`, if any.
    pub(super) fn position_of(
        &self,
        log: &sled::Tree,
        stream: &StreamId,
        version: u64,
    ) -> Result<Option<u64>, StoreError> {
        let in_tail = self.with_runs(stream, |runs| {
            runs.iter()
                .find(|run| (run.first..=run.last()).contains(&version))
                .map(|run| run.positions[(version - run.first) as usize])
        });
        if in_tail.is_some() {
            return Ok(in_tail);
        }
        Ok(block_at(log, stream.as_str(), version)?
            .and_then(|(first, positions)| positions.get((version - first) as usize).copied()))
    }
}

/// Adds one entry to the tail's current runs; the stream id is cloned
/// only for a stream's first entry.
fn push(
    tail: &mut Tail,
    (stream, version): (&StreamId, u64),
    id: Uuid,
    position: u64,
    rebuilt: bool,
) -> Result<(), StoreError> {
    if position <= tail.last {
        return Err(corrupt(format_args!(
            "stream index: position {position} recorded after {}",
            tail.last
        )));
    }
    // Checked before anything changes: a refused entry leaves the tail
    // as it was.
    if let Some(run) = tail.current.streams.get(stream) {
        if run.last() + 1 != version {
            return Err(corrupt(format_args!(
                "{stream} version {version} follows version {}",
                run.last()
            )));
        }
    }
    // One hash of the id: the event's entry, or the refusal of a second.
    match tail.current.ids.entry(id) {
        Entry::Occupied(_) => {
            return Err(corrupt(format_args!(
                "event id {id} recorded twice, the second time at {position}"
            )));
        }
        Entry::Vacant(entry) => entry.insert(position),
    };
    tail.last = position;
    match tail.current.streams.get_mut(stream) {
        Some(run) => run.positions.push(position),
        None => {
            tail.current.streams.insert(
                stream.clone(),
                Run {
                    first: version,
                    positions: vec![position],
                    rebuilt,
                },
            );
        }
    }
    Ok(())
}

/// Cuts every block back to the versions at or below position `head`
/// (positions grow with a stream's versions). A scan of the whole stream
/// index: only after an accepted loss. `Mindexed` is set by the id index's
/// cut-back after it.
fn cut_back(log: &sled::Tree, head: u64) -> Result<(), StoreError> {
    for entry in log.scan_prefix([STREAM]) {
        let (key, value) = entry.map_err(sled_error)?;
        let positions = block_positions(&value)?;
        let keep = positions.partition_point(|&position| position <= head);
        if keep == positions.len() {
            continue;
        }
        if keep == 0 {
            log.remove(key).map_err(sled_error)?;
        } else {
            log.insert(key, &value[..keep * 8]).map_err(sled_error)?;
        }
    }
    Ok(())
}

/// The stored `Mindexed` (0 when absent).
pub(super) fn stored_indexed(log: &sled::Tree) -> Result<u64, StoreError> {
    log.get(META_INDEXED)
        .map_err(sled_error)?
        .map_or(Ok(0), |bytes| decode_u64(&bytes))
}

/// A block's positions, or corrupt when its value is not whole positions.
pub(super) fn block_positions(value: &[u8]) -> Result<Vec<u64>, StoreError> {
    if value.is_empty() || value.len() % 8 != 0 {
        return Err(corrupt(format_args!(
            "a stream index block of {} bytes",
            value.len()
        )));
    }
    Ok(value
        .chunks_exact(8)
        .map(|bytes| u64::from_be_bytes(bytes.try_into().expect("8 bytes")))
        .collect())
}

/// The first version of a block key under `prefix`.
fn block_first(prefix: &[u8], key: &[u8]) -> Result<u64, StoreError> {
    decode_u64(key.get(prefix.len()..).unwrap_or_default())
}

/// The version of `stream`'s last event in its blocks (0 when it has
/// none): its last block's, one descent of the tree. The tail is not seen
/// here ([`StreamIndex::head`] sees both).
pub(super) fn blocks_head(log: &sled::Tree, stream: &str) -> Result<u64, StoreError> {
    Ok(block_at(log, stream, u64::MAX)?
        .map_or(0, |(first, positions)| first + positions.len() as u64 - 1))
}

/// The block of `stream` whose versions start at or below `version`.
pub(super) fn block_at(
    log: &sled::Tree,
    stream: &str,
    version: u64,
) -> Result<Option<(u64, Vec<u64>)>, StoreError> {
    let start = stream_prefix(stream);
    match log
        .range(start.clone()..=stream_key(stream, version))
        .next_back()
    {
        None => Ok(None),
        Some(entry) => {
            let (key, value) = entry.map_err(sled_error)?;
            Ok(Some((block_first(&start, &key)?, block_positions(&value)?)))
        }
    }
}

/// The entries of one stream, as [`StreamIndex::entries`] reads them:
/// going forward the blocks' then the tail's, going backward the other way
/// round. A version is given once even where blocks overlap, which only
/// damaged or hand-edited stores hold (a flush cut short by a crash is
/// covered by the tail until its rewrite removes what it left).
pub(super) struct Entries<'a> {
    log: &'a sled::Tree,
    prefix: Vec<u8>,
    from: u64,
    forward: bool,
    /// The tail's first version: blocks give only the versions below it.
    below: u64,
    /// The tail's entries to give, in reading order.
    tail: std::vec::IntoIter<(u64, u64)>,
    phase: Phase,
    /// The entries of the block being read, in reading order, reversed
    /// for popping.
    block: Vec<(u64, u64)>,
    /// The key of the last block read.
    last_key: Option<Vec<u8>>,
    last_given: Option<u64>,
}

/// What [`Entries`] reads from next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Blocks,
    Tail,
    Done,
}

impl Entries<'_> {
    /// The key of this stream's block that starts at `version`.
    fn key(&self, version: u64) -> Vec<u8> {
        let mut key = self.prefix.clone();
        key.extend_from_slice(&version.to_be_bytes());
        key
    }

    /// Reads the next block in reading order into `self.block`; false when
    /// there is none.
    fn next_block(&mut self) -> Result<bool, StoreError> {
        let entry = match (&self.last_key, self.forward) {
            (None, true) => {
                // The block holding `from` may start before it.
                let key = self.key(self.from);
                match self.log.range(self.prefix.clone()..=key).next_back() {
                    Some(entry) => Some(entry),
                    None => self.log.range(self.prefix.clone()..).next(),
                }
            }
            (None, false) => {
                let key = self.key(self.from.min(self.below.saturating_sub(1)));
                self.log.range(self.prefix.clone()..=key).next_back()
            }
            (Some(after), true) => self
                .log
                .range((
                    std::ops::Bound::Excluded(after.clone()),
                    std::ops::Bound::Unbounded,
                ))
                .next(),
            (Some(before), false) => self
                .log
                .range(self.prefix.clone()..before.clone())
                .next_back(),
        };
        let Some(entry) = entry else {
            return Ok(false);
        };
        let (key, value) = entry.map_err(sled_error)?;
        if !key.starts_with(&self.prefix) {
            return Ok(false);
        }
        let first = block_first(&self.prefix, &key)?;
        if self.forward && first >= self.below {
            return Ok(false);
        }
        let positions = block_positions(&value)?;
        self.last_key = Some(key.to_vec());
        let (from, below, forward) = (self.from, self.below, self.forward);
        let mut entries: Vec<(u64, u64)> = (first..)
            .zip(positions)
            .filter(|&(version, _)| {
                version < below
                    && if forward {
                        version >= from
                    } else {
                        version <= from
                    }
            })
            .collect();
        if forward {
            entries.reverse();
        }
        self.block = entries;
        Ok(true)
    }

    fn next_from_blocks(&mut self) -> Result<Option<(u64, u64)>, StoreError> {
        loop {
            while let Some(entry) = self.block.pop() {
                let fresh = match (self.last_given, self.forward) {
                    (None, _) => true,
                    (Some(last), true) => entry.0 > last,
                    (Some(last), false) => entry.0 < last,
                };
                if fresh {
                    self.last_given = Some(entry.0);
                    return Ok(Some(entry));
                }
            }
            if !self.next_block()? {
                return Ok(None);
            }
        }
    }
}

impl Iterator for Entries<'_> {
    type Item = Result<(u64, u64), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.phase {
                Phase::Blocks => match self.next_from_blocks() {
                    Ok(Some(entry)) => return Some(Ok(entry)),
                    Ok(None) if self.forward => self.phase = Phase::Tail,
                    Ok(None) => self.phase = Phase::Done,
                    Err(e) => {
                        self.phase = Phase::Done;
                        return Some(Err(e));
                    }
                },
                Phase::Tail => match self.tail.next() {
                    Some(entry) => {
                        self.last_given = Some(entry.0);
                        return Some(Ok(entry));
                    }
                    None if self.forward => self.phase = Phase::Done,
                    None => self.phase = Phase::Blocks,
                },
                Phase::Done => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Metadata, Position, Version};

    fn events(
        stream: &str,
        versions: std::ops::Range<u64>,
        first_position: u64,
    ) -> Vec<RecordedEvent> {
        versions
            .zip(first_position..)
            .map(|(version, position)| RecordedEvent {
                event_id: uuid::Uuid::now_v7(),
                stream_id: StreamId::new(stream).unwrap(),
                version: Version(version),
                position: Position(position),
                event_type: "Placed".into(),
                schema_version: 1,
                recorded_at_micros: 0,
                metadata: Metadata::default(),
                payload: Vec::new(),
            })
            .collect()
    }

    /// The tail asks the indexer at its flush size, nobody while a flush is
    /// under way, and the writer itself at eight flush sizes, so that it
    /// stays bounded when the indexer cannot keep up; and what it records
    /// out of order is refused, not indexed.
    #[test]
    fn the_tail_says_who_flushes_it_and_refuses_what_is_out_of_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = db.open_tree("log").unwrap();
        let index = StreamIndex::open(&log, 0, 10).unwrap();
        assert_eq!(index.record(&events("a", 1..10, 1)).unwrap(), Due::No);
        assert_eq!(
            index.record(&events("a", 10..11, 10)).unwrap(),
            Due::Indexer
        );
        // A flush taken aside and not finished: the next tail waits for it,
        // until it holds eight flush sizes.
        index.write_tail().flushing = Some(Arc::new(TailEntries::default()));
        let mut next = 11;
        let mut dues = Vec::new();
        while next <= 80 {
            dues.push(index.record(&events("a", next..next + 10, next)).unwrap());
            next += 10;
        }
        assert_eq!(
            dues.iter().filter(|d| **d == Due::Writer).count(),
            1,
            "{dues:?}"
        );
        assert_eq!(dues.last(), Some(&Due::Writer), "{dues:?}");
        assert!(
            dues[..dues.len() - 1].iter().all(|d| *d == Due::No),
            "{dues:?}"
        );
        // A position already recorded, or a version that does not follow.
        assert!(index.record(&events("b", 1..2, 5)).is_err());
        assert!(index.record(&events("a", 99..100, next)).is_err());
        // The flush taken aside stands for one that failed: a later flush
        // refuses rather than take the tail aside over it, and writes
        // nothing (`Mindexed` stays where it was).
        assert!(matches!(
            index.flush(&log, false),
            Err(StoreError::Poisoned(_))
        ));
        assert_eq!(stored_indexed(&log).unwrap(), 0);
        assert_eq!(index.read_tail().current.ids.len(), 80);
    }
}
