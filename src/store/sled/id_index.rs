//! The event-id index, kept off the commit path as sorted runs
//! (docs/design.md, "The event-id index: sorted runs"). Format 4 wrote one
//! sled key per event (`I + id`) in every group commit: half of the commit
//! path's sled work, and most of the memory a large store kept, because
//! sled 0.34 keeps small keys' pages resident. Now a group's ids go into
//! the index's in-memory tail with its stream entries (`stream_index.rs`),
//! and the indexer writes each flushed tail as one *run*: the tail's ids
//! sorted, 170 `(id, position)` entries to a block of 4,080 bytes under
//! `J + run + first id`, and the run's *summary* (the first id of each
//! block and a blocked Bloom filter, 10 bits per id) under `K + run +
//! piece`. `Mruns` lists the live runs; it is written with `Mindexed` in
//! one batch, so a run is either part of the index with every id up to
//! `Mindexed`, or garbage that opening removes.
//!
//! A lookup reads the tail, then asks each run's filter (one cache line);
//! only a run whose filter says maybe is read, one block found through the
//! fences. Fresh ids (the commit path's idempotency check asks for every
//! id) cost a few filter probes and no sled read. Runs of about the same
//! size are merged four at a time, so a store of n ids holds about
//! `3 log4(n / flush size)` runs; the summaries stay in memory (about 1.3
//! bytes per id).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use uuid::Uuid;

use super::format::{corrupt, decode_u64, ID_BLOCK, ID_SUMMARY, META_INDEXED, META_RUNS};
use super::sled_error;
use crate::error::StoreError;

/// Entries per block: 24 bytes each (the id, then the position, both
/// big-endian), 4,080 bytes a block, as the log's chunks are sized.
pub(super) const BLOCK_ENTRIES: usize = 170;
const ENTRY: usize = 24;
/// The most bytes of a run's summary one sled value holds, the size of a
/// block: 64 KiB pieces went to blob files of their own, which sled 0.34
/// writes and removes beside its log.
const SUMMARY_PIECE: usize = 4096;
/// Runs of one size tier merged into one.
const MERGE_WIDTH: usize = 4;
/// Filter bits per id: with 7 probes in one 512-bit block, about 1% of
/// the runs that lack an id say maybe.
const FILTER_BITS_PER_ID: u64 = 10;
const FILTER_PROBES: u64 = 7;
/// A flush or a merge of the indexes pauses for [`PACE_PAUSE`] after every
/// this many blocks while the tail that grows beside it is not yet due:
/// written in one burst, a flush of 10,000 streams' blocks stalled the
/// writer's group commits (sled's global lock, its shared I/O threads, the
/// CPU) and took p99 of appends at 39,000/s from 1.6 ms to 7-9 ms
/// (`latency_probe store 39000`).
const PACE_EVERY_BLOCKS: usize = 16;
const PACE_PAUSE: std::time::Duration = std::time::Duration::from_micros(200);

/// A blocked Bloom filter: each id sets [`FILTER_PROBES`] bits of one
/// 512-bit block, so a lookup touches one cache line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Filter {
    blocks: Vec<[u64; 8]>,
}

/// splitmix64's finalizer: ids share their leading bits (a v7 id starts
/// with its time, a test's may count from 1), so they are mixed first.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// An id's hashes for the filters: which block (`a` modulo a filter's
/// block count) and the probes' bits. Computed once per lookup, not once
/// per run.
#[derive(Clone, Copy)]
struct IdHash {
    a: u64,
    bits: u64,
}

impl IdHash {
    fn of(id: u128) -> Self {
        let a = mix(id as u64 ^ mix((id >> 64) as u64));
        Self {
            a,
            bits: mix(a ^ 0x9e37_79b9_7f4a_7c15),
        }
    }

    fn block(self, blocks: usize) -> usize {
        (self.a % blocks as u64) as usize
    }
}

impl Filter {
    fn with_capacity(ids: u64) -> Self {
        let blocks = (ids.saturating_mul(FILTER_BITS_PER_ID))
            .div_ceil(512)
            .max(1);
        Self {
            blocks: vec![[0; 8]; blocks as usize],
        }
    }

    /// The block and the bits of `id`.
    fn insert(&mut self, id: IdHash) {
        let at = id.block(self.blocks.len());
        let block = &mut self.blocks[at];
        for probe in 0..FILTER_PROBES {
            let bit = (id.bits >> (probe * 9)) & 511;
            block[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    fn may_contain(&self, id: IdHash) -> bool {
        let block = &self.blocks[id.block(self.blocks.len())];
        (0..FILTER_PROBES).all(|probe| {
            let bit = (id.bits >> (probe * 9)) & 511;
            block[(bit / 64) as usize] & (1 << (bit % 64)) != 0
        })
    }
}

/// One sorted run: where its blocks start, and its filter.
#[derive(Debug)]
pub(super) struct IdRun {
    pub(super) run: u64,
    pub(super) count: u64,
    /// The first id of each block, in order.
    fences: Vec<u128>,
    filter: Filter,
}

impl IdRun {
    /// Runs within a factor of four in size share a tier.
    fn tier(&self) -> u32 {
        (63 - self.count.max(1).leading_zeros()) / 2
    }

    /// The one block that may hold `id`, if the filter lets it.
    fn block_for(&self, id: u128, hash: IdHash) -> Option<u128> {
        if !self.filter.may_contain(hash) {
            return None;
        }
        let after = self.fences.partition_point(|&first| first <= id);
        after.checked_sub(1).map(|block| self.fences[block])
    }

    /// The summary as stored: the count, the fences, the filter.
    fn summary(&self) -> Vec<u8> {
        let mut bytes =
            Vec::with_capacity(24 + self.fences.len() * 16 + self.filter.blocks.len() * 64);
        bytes.extend_from_slice(&self.count.to_be_bytes());
        bytes.extend_from_slice(&(self.fences.len() as u64).to_be_bytes());
        for first in &self.fences {
            bytes.extend_from_slice(&first.to_be_bytes());
        }
        bytes.extend_from_slice(&(self.filter.blocks.len() as u64).to_be_bytes());
        for block in &self.filter.blocks {
            for word in block {
                bytes.extend_from_slice(&word.to_be_bytes());
            }
        }
        bytes
    }

    fn from_summary(run: u64, bytes: &[u8]) -> Result<Self, StoreError> {
        let bad = || corrupt(format_args!("the summary of id index run {run}"));
        let mut rest = bytes;
        let mut take = |n: usize| -> Result<&[u8], StoreError> {
            if rest.len() < n {
                return Err(bad());
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let count = decode_u64(take(8)?)?;
        let fences_len = decode_u64(take(8)?)? as usize;
        let fences = take(fences_len.checked_mul(16).ok_or_else(bad)?)?
            .chunks_exact(16)
            .map(|b| u128::from_be_bytes(b.try_into().expect("16 bytes")))
            .collect::<Vec<_>>();
        let blocks_len = decode_u64(take(8)?)? as usize;
        let blocks = take(blocks_len.checked_mul(64).ok_or_else(bad)?)?
            .chunks_exact(64)
            .map(|block| {
                let mut words = [0u64; 8];
                for (word, b) in words.iter_mut().zip(block.chunks_exact(8)) {
                    *word = u64::from_be_bytes(b.try_into().expect("8 bytes"));
                }
                words
            })
            .collect::<Vec<_>>();
        // Every block but the last is full: fewer fences would hide ids.
        if !rest.is_empty()
            || blocks.is_empty()
            || fences.len() as u64 != count.div_ceil(BLOCK_ENTRIES as u64)
            || fences.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(bad());
        }
        Ok(Self {
            run,
            count,
            fences,
            filter: Filter { blocks },
        })
    }
}

pub(super) fn block_key(run: u64, first: u128) -> [u8; 25] {
    let mut key = [0u8; 25];
    key[0] = ID_BLOCK;
    key[1..9].copy_from_slice(&run.to_be_bytes());
    key[9..].copy_from_slice(&first.to_be_bytes());
    key
}

fn run_prefix(tag: u8, run: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = tag;
    key[1..].copy_from_slice(&run.to_be_bytes());
    key
}

fn summary_key(run: u64, piece: u32) -> [u8; 13] {
    let mut key = [0u8; 13];
    key[..9].copy_from_slice(&run_prefix(ID_SUMMARY, run));
    key[9..].copy_from_slice(&piece.to_be_bytes());
    key
}

/// A block's entries, or corrupt when it is not whole entries in
/// increasing id order.
pub(super) fn block_entries(value: &[u8]) -> Result<Vec<(u128, u64)>, StoreError> {
    if value.is_empty() || value.len() % ENTRY != 0 {
        return Err(corrupt(format_args!(
            "an id index block of {} bytes",
            value.len()
        )));
    }
    let entries: Vec<(u128, u64)> = value
        .chunks_exact(ENTRY)
        .map(|entry| {
            (
                u128::from_be_bytes(entry[..16].try_into().expect("16 bytes")),
                u64::from_be_bytes(entry[16..].try_into().expect("8 bytes")),
            )
        })
        .collect();
    if entries.windows(2).any(|w| w[0].0 >= w[1].0) {
        return Err(corrupt("an id index block out of order"));
    }
    Ok(entries)
}

/// The runs listed by `Mruns`, as `(run, count)`, and the next run number.
pub(super) fn stored_runs(log: &sled::Tree) -> Result<(Vec<(u64, u64)>, u64), StoreError> {
    let Some(value) = log.get(META_RUNS).map_err(sled_error)? else {
        return Ok((Vec::new(), 0));
    };
    if value.len() < 8 || (value.len() - 8) % 16 != 0 {
        return Err(corrupt(format_args!(
            "the id index's run list of {} bytes",
            value.len()
        )));
    }
    let next = decode_u64(&value[..8])?;
    let runs = value[8..]
        .chunks_exact(16)
        .map(|b| {
            (
                u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
                u64::from_be_bytes(b[8..].try_into().expect("8 bytes")),
            )
        })
        .collect::<Vec<_>>();
    if next == u64::MAX || runs.iter().any(|&(run, _)| run >= next) {
        return Err(corrupt("the id index's run list names a run past its next"));
    }
    Ok((runs, next))
}

fn runs_value(runs: &[Arc<IdRun>], next: u64) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + runs.len() * 16);
    value.extend_from_slice(&next.to_be_bytes());
    for run in runs {
        value.extend_from_slice(&run.run.to_be_bytes());
        value.extend_from_slice(&run.count.to_be_bytes());
    }
    value
}

/// Pauses between blocks of a long write (see [`PACE_EVERY_BLOCKS`]).
pub(super) struct Pace<'a> {
    paced: bool,
    /// Whether the tail is due a flush: the write then goes on unpaused.
    behind: &'a dyn Fn() -> bool,
    /// A merge's: flushes the tail when it is due, between two blocks.
    flush: Option<&'a dyn Fn() -> Result<(), StoreError>>,
    written: usize,
}

impl<'a> Pace<'a> {
    pub(super) fn new(paced: bool, behind: &'a dyn Fn() -> bool) -> Self {
        Self {
            paced,
            behind,
            flush: None,
            written: 0,
        }
    }

    /// No pause at all (an upgrade, an import, a test).
    pub(super) fn unpaced() -> Pace<'static> {
        fn never() -> bool {
            false
        }
        Pace::new(false, &never)
    }

    /// Has the write flush the tail when it comes due (a merge's).
    pub(super) fn flush_when_behind(&mut self, flush: &'a dyn Fn() -> Result<(), StoreError>) {
        self.flush = Some(flush);
    }

    /// Counts a block written, and pauses (or flushes a due tail) after
    /// every [`PACE_EVERY_BLOCKS`].
    pub(super) fn block_written(&mut self) -> Result<(), StoreError> {
        self.written += 1;
        if self.written % PACE_EVERY_BLOCKS != 0 {
            return Ok(());
        }
        if (self.behind)() {
            if let Some(flush) = self.flush {
                flush()?;
            }
        } else if self.paced {
            std::thread::sleep(PACE_PAUSE);
        }
        Ok(())
    }
}

/// Writes one run's blocks as its entries come, in increasing id order,
/// then its summary.
struct RunWriter<'a, 'p> {
    log: &'a sled::Tree,
    run: u64,
    block: Vec<u8>,
    block_first: u128,
    fences: Vec<u128>,
    filter: Filter,
    count: u64,
    last: Option<u128>,
    pace: &'a mut Pace<'p>,
}

impl<'a, 'p> RunWriter<'a, 'p> {
    fn new(log: &'a sled::Tree, run: u64, capacity: u64, pace: &'a mut Pace<'p>) -> Self {
        Self {
            log,
            run,
            block: Vec::with_capacity(BLOCK_ENTRIES * ENTRY),
            block_first: 0,
            fences: Vec::new(),
            filter: Filter::with_capacity(capacity),
            count: 0,
            last: None,
            pace,
        }
    }

    fn push(&mut self, id: u128, position: u64) -> Result<(), StoreError> {
        if self.last.is_some_and(|last| id <= last) {
            return Err(corrupt(format_args!(
                "id index run {}: id {} out of order",
                self.run,
                Uuid::from_u128(id)
            )));
        }
        if self.block.is_empty() {
            self.block_first = id;
        }
        self.block.extend_from_slice(&id.to_be_bytes());
        self.block.extend_from_slice(&position.to_be_bytes());
        self.filter.insert(IdHash::of(id));
        self.count += 1;
        self.last = Some(id);
        if self.block.len() == BLOCK_ENTRIES * ENTRY {
            self.write_block()?;
        }
        Ok(())
    }

    fn write_block(&mut self) -> Result<(), StoreError> {
        let block = std::mem::replace(&mut self.block, Vec::with_capacity(BLOCK_ENTRIES * ENTRY));
        self.log
            .insert(block_key(self.run, self.block_first), block)
            .map_err(sled_error)?;
        self.fences.push(self.block_first);
        self.pace.block_written()
    }

    fn finish(mut self) -> Result<IdRun, StoreError> {
        if !self.block.is_empty() {
            self.write_block()?;
        }
        let run = IdRun {
            run: self.run,
            count: self.count,
            fences: self.fences,
            filter: self.filter,
        };
        for (piece, bytes) in (0u32..).zip(run.summary().chunks(SUMMARY_PIECE)) {
            self.log
                .insert(summary_key(run.run, piece), bytes)
                .map_err(sled_error)?;
        }
        Ok(run)
    }
}

/// The entries of one run in id order, read block by block.
pub(super) struct RunEntries<'a> {
    blocks: sled::Iter,
    block: std::vec::IntoIter<(u128, u64)>,
    _log: std::marker::PhantomData<&'a sled::Tree>,
}

impl RunEntries<'_> {
    pub(super) fn new(log: &sled::Tree, run: u64) -> RunEntries<'_> {
        RunEntries {
            blocks: log.range(run_prefix(ID_BLOCK, run).to_vec()..run_end(ID_BLOCK, run)),
            block: Vec::new().into_iter(),
            _log: std::marker::PhantomData,
        }
    }
}

impl Iterator for RunEntries<'_> {
    type Item = Result<(u128, u64), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(entry) = self.block.next() {
                return Some(Ok(entry));
            }
            let value = match self.blocks.next()? {
                Ok((_, value)) => value,
                Err(e) => return Some(Err(sled_error(e))),
            };
            match block_entries(&value) {
                Ok(entries) => self.block = entries.into_iter(),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// The runs of one open store, shared by the writer (whose idempotency
/// check looks ids up), the readers and the indexer (which adds and
/// merges runs).
#[derive(Debug)]
pub(super) struct IdRuns {
    /// The live runs (a flush's new run first, a merged run where its
    /// inputs were; ids are unique, so the order only saves probes).
    /// Replaced whole, so a lookup reads one
    /// consistent list while a merge swaps runs.
    runs: RwLock<Arc<Vec<Arc<IdRun>>>>,
    next_run: AtomicU64,
    /// Serializes changes of the run list with the write of `Mruns`.
    manifest: Mutex<()>,
    /// One merge at a time.
    merging: Mutex<()>,
}

impl IdRuns {
    /// The runs `Mruns` lists, with their summaries; removes what a flush
    /// or merge cut short by a crash left (runs that `Mruns` does not list).
    pub(super) fn open(log: &sled::Tree) -> Result<Self, StoreError> {
        let (listed, next) = stored_runs(log)?;
        let mut runs = Vec::with_capacity(listed.len());
        for &(run, count) in &listed {
            let mut summary = Vec::new();
            for piece in log.scan_prefix(run_prefix(ID_SUMMARY, run)) {
                let (_, value) = piece.map_err(sled_error)?;
                summary.extend_from_slice(&value);
            }
            let loaded = IdRun::from_summary(run, &summary)?;
            if loaded.count != count {
                return Err(corrupt(format_args!(
                    "id index run {run}: {} ids in its summary, {count} in the run list",
                    loaded.count
                )));
            }
            runs.push(Arc::new(loaded));
        }
        for tag in [ID_BLOCK, ID_SUMMARY] {
            for run in present_runs(log, tag)? {
                if !listed.iter().any(|&(live, _)| live == run) {
                    tracing::debug!(run, "removing an id index run a crash left unfinished");
                    remove_run_keys(log, tag, run)?;
                }
            }
        }
        Ok(Self {
            runs: RwLock::new(Arc::new(runs)),
            next_run: AtomicU64::new(next),
            manifest: Mutex::new(()),
            merging: Mutex::new(()),
        })
    }

    fn current(&self) -> Arc<Vec<Arc<IdRun>>> {
        Arc::clone(&self.runs.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Runs `f` on the live runs, `(run, count)`, while no
    /// merge removes one.
    pub(super) fn without_merges<T>(&self, f: impl FnOnce(&[(u64, u64)]) -> T) -> T {
        let _one = self.merging.lock().unwrap_or_else(|p| p.into_inner());
        let runs: Vec<(u64, u64)> = self
            .current()
            .iter()
            .map(|run| (run.run, run.count))
            .collect();
        f(&runs)
    }

    /// The position stored for `id` in the runs, if any.
    pub(super) fn find(&self, log: &sled::Tree, id: Uuid) -> Result<Option<u64>, StoreError> {
        let id = id.as_u128();
        let hash = IdHash::of(id);
        // A merge swaps the list once per four runs: a lookup that keeps
        // meeting removed blocks is looking at damage, not at merges.
        for _ in 0..16 {
            let runs = self.current();
            let mut vanished = false;
            for run in runs.iter() {
                let Some(first) = run.block_for(id, hash) else {
                    continue;
                };
                let Some(value) = log.get(block_key(run.run, first)).map_err(sled_error)? else {
                    vanished = true;
                    break;
                };
                let entries = block_entries(&value)?;
                if let Ok(at) = entries.binary_search_by_key(&id, |&(entry, _)| entry) {
                    return Ok(Some(entries[at].1));
                }
            }
            if !vanished {
                return Ok(None);
            }
            // A merge removes its inputs' blocks after it swapped the list:
            // look again in the new list, which has their merged run.
            if Arc::ptr_eq(&runs, &self.current()) {
                break;
            }
        }
        Err(corrupt(format_args!(
            "the id index misses a block of a live run, looking up {}",
            Uuid::from_u128(id)
        )))
    }

    /// Writes `entries` (sorted by id, unique) as a new run and then, in
    /// one batch, the run list with it and `Mindexed` = `indexed`: the
    /// flush of a tail.
    pub(super) fn add(
        &self,
        log: &sled::Tree,
        entries: &[(u128, u64)],
        indexed: u64,
        pace: &mut Pace<'_>,
    ) -> Result<(), StoreError> {
        let run = self.next_run.fetch_add(1, Ordering::Relaxed);
        let mut writer = RunWriter::new(log, run, entries.len() as u64, pace);
        for &(id, position) in entries {
            writer.push(id, position)?;
        }
        let run = Arc::new(writer.finish()?);
        self.swap(log, &[], Some(run), Some(indexed))
    }

    /// Writes `entries` (in increasing id order, about `capacity` of them)
    /// as a new run and adds it to the run list, unpaced: the upgrade's
    /// conversion of an earlier format's id index.
    pub(super) fn add_sorted(
        &self,
        log: &sled::Tree,
        entries: impl Iterator<Item = Result<(u128, u64), StoreError>>,
        capacity: u64,
    ) -> Result<(), StoreError> {
        let run = self.next_run.fetch_add(1, Ordering::Relaxed);
        let mut pace = Pace::unpaced();
        let mut writer = RunWriter::new(log, run, capacity, &mut pace);
        for entry in entries {
            let (id, position) = entry?;
            writer.push(id, position)?;
        }
        let run = Arc::new(writer.finish()?);
        self.swap(log, &[], Some(run), None)
    }

    /// Replaces the runs `removed` with `added` in the list and in
    /// `Mruns` (with `Mindexed` when given, in the same batch), then
    /// removes the keys of `removed`.
    fn swap(
        &self,
        log: &sled::Tree,
        removed: &[u64],
        added: Option<Arc<IdRun>>,
        indexed: Option<u64>,
    ) -> Result<(), StoreError> {
        {
            let _one = self.manifest.lock().unwrap_or_else(|p| p.into_inner());
            let mut runs: Vec<Arc<IdRun>> = added.into_iter().collect();
            runs.extend(
                self.current()
                    .iter()
                    .filter(|run| !removed.contains(&run.run))
                    .cloned(),
            );
            let mut batch = sled::Batch::default();
            batch.insert(
                META_RUNS,
                runs_value(&runs, self.next_run.load(Ordering::Relaxed)),
            );
            if let Some(indexed) = indexed {
                batch.insert(META_INDEXED, &indexed.to_be_bytes());
            }
            log.apply_batch(batch).map_err(sled_error)?;
            *self.runs.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(runs);
        }
        for &run in removed {
            remove_run_keys(log, ID_BLOCK, run)?;
            remove_run_keys(log, ID_SUMMARY, run)?;
        }
        Ok(())
    }

    /// Merges runs of one size tier, four at a time, until no tier holds
    /// four; stops early (leaving a run that the next open removes) once
    /// `stop` is set.
    pub(super) fn merge(
        &self,
        log: &sled::Tree,
        stop: &AtomicBool,
        pace: &mut Pace<'_>,
    ) -> Result<(), StoreError> {
        // Held by another merge, or by `verify` reading the runs: this one
        // is left to the next flush.
        let _one = match self.merging.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        };
        while let Some(inputs) = merge_candidates(&self.current()) {
            if !self.merge_runs(log, &inputs, u64::MAX, stop, pace, None)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Rewrites every run as one without the entries past `head`, then
    /// writes its list and `Mindexed` = `head` in one batch: after a loss
    /// the store was told to accept, before new events take those
    /// positions.
    pub(super) fn cut_back(&self, log: &sled::Tree, head: u64) -> Result<(), StoreError> {
        let _one = self.merging.lock().unwrap_or_else(|p| p.into_inner());
        let inputs: Vec<Arc<IdRun>> = self.current().iter().cloned().collect();
        if inputs.is_empty() {
            return self.swap(log, &[], None, Some(head));
        }
        let never = AtomicBool::new(false);
        self.merge_runs(log, &inputs, head, &never, &mut Pace::unpaced(), Some(head))?;
        Ok(())
    }

    /// Merges `inputs` into one run of their entries at or below
    /// `keep_through`, swapped in with `Mindexed` = `indexed` if given;
    /// false when `stop` cut it short.
    fn merge_runs(
        &self,
        log: &sled::Tree,
        inputs: &[Arc<IdRun>],
        keep_through: u64,
        stop: &AtomicBool,
        pace: &mut Pace<'_>,
        indexed: Option<u64>,
    ) -> Result<bool, StoreError> {
        let run = self.next_run.fetch_add(1, Ordering::Relaxed);
        let capacity = inputs.iter().map(|run| run.count).sum();
        let mut writer = RunWriter::new(log, run, capacity, pace);
        let mut sources: Vec<RunEntries<'_>> = inputs
            .iter()
            .map(|input| RunEntries::new(log, input.run))
            .collect();
        let mut fronts: Vec<Option<(u128, u64)>> = Vec::with_capacity(sources.len());
        for source in &mut sources {
            fronts.push(source.next().transpose()?);
        }
        let mut merged = 0u64;
        while let Some((id, position)) = fronts.iter().flatten().min().copied() {
            for (front, source) in fronts.iter_mut().zip(&mut sources) {
                match *front {
                    Some((other, at)) if other == id => {
                        if at != position {
                            return Err(corrupt(format_args!(
                                "the id index holds {} at positions {position} and {at}",
                                Uuid::from_u128(id)
                            )));
                        }
                        *front = source.next().transpose()?;
                    }
                    _ => {}
                }
            }
            if position <= keep_through {
                writer.push(id, position)?;
            }
            merged += 1;
            if merged % (BLOCK_ENTRIES as u64) == 0 && stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
        }
        let merged = Arc::new(writer.finish()?);
        let removed: Vec<u64> = inputs.iter().map(|run| run.run).collect();
        self.swap(log, &removed, Some(merged), indexed)?;
        Ok(true)
    }
}

/// The [`MERGE_WIDTH`] smallest runs of the lowest tier that holds that
/// many, if one does.
fn merge_candidates(runs: &[Arc<IdRun>]) -> Option<Vec<Arc<IdRun>>> {
    let mut tiers: Vec<u32> = runs.iter().map(|run| run.tier()).collect();
    tiers.sort_unstable();
    tiers.dedup();
    tiers.into_iter().find_map(|tier| {
        let mut of_tier: Vec<Arc<IdRun>> = runs
            .iter()
            .filter(|run| run.tier() == tier)
            .cloned()
            .collect();
        (of_tier.len() >= MERGE_WIDTH).then(|| {
            of_tier.sort_by_key(|run| run.count);
            of_tier.truncate(MERGE_WIDTH);
            of_tier
        })
    })
}

/// The run numbers that have keys under `tag`, one seek per run.
fn present_runs(log: &sled::Tree, tag: u8) -> Result<Vec<u64>, StoreError> {
    let mut runs = Vec::new();
    let mut from = run_prefix(tag, 0).to_vec();
    let end = [tag + 1];
    while let Some(entry) = log.range(from.as_slice()..&end[..]).keys().next() {
        let key = entry.map_err(sled_error)?;
        let Some(run) = key.get(1..9).map(decode_u64).transpose()? else {
            return Err(corrupt(format_args!(
                "a malformed id index key of {} bytes",
                key.len()
            )));
        };
        runs.push(run);
        match run.checked_add(1) {
            Some(next) => from = run_prefix(tag, next).to_vec(),
            None => break,
        }
    }
    Ok(runs)
}

/// The first key after every key of `run` under `tag`.
fn run_end(tag: u8, run: u64) -> Vec<u8> {
    match run.checked_add(1) {
        Some(next) => run_prefix(tag, next).to_vec(),
        None => vec![tag + 1],
    }
}

fn remove_run_keys(log: &sled::Tree, tag: u8, run: u64) -> Result<(), StoreError> {
    for key in log
        .range(run_prefix(tag, run).to_vec()..run_end(tag, run))
        .keys()
    {
        log.remove(key.map_err(sled_error)?).map_err(sled_error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_has_no_false_negative_and_few_false_positives() {
        let mut filter = Filter::with_capacity(10_000);
        for n in 0..10_000u128 {
            filter.insert(IdHash::of(n));
        }
        assert!((0..10_000u128).all(|n| filter.may_contain(IdHash::of(n))));
        let false_positives = (10_000..110_000u128)
            .filter(|&n| filter.may_contain(IdHash::of(n)))
            .count();
        // About 1% expected at 10 bits per id.
        assert!(false_positives < 2_500, "{false_positives} of 100000");
    }

    #[test]
    fn a_summary_reads_back_and_damage_is_refused() {
        let mut filter = Filter::with_capacity(3);
        filter.insert(IdHash::of(7));
        let mut run = IdRun {
            run: 4,
            count: 3,
            fences: vec![1],
            filter,
        };
        let back = IdRun::from_summary(4, &run.summary()).unwrap();
        assert_eq!(
            (back.count, &back.fences, &back.filter),
            (3, &run.fences, &run.filter)
        );
        let summary = run.summary();
        assert!(IdRun::from_summary(4, &summary[..summary.len() - 1]).is_err());
        // 171 ids take two blocks: one fence would hide the last id.
        run.count = 171;
        assert!(IdRun::from_summary(4, &run.summary()).is_err());
        run.fences.push(9);
        assert!(IdRun::from_summary(4, &run.summary()).is_ok());
    }

    fn runs_of(counts: &[u64]) -> Vec<Arc<IdRun>> {
        (0u64..)
            .zip(counts)
            .map(|(run, &count)| {
                Arc::new(IdRun {
                    run,
                    count,
                    fences: Vec::new(),
                    filter: Filter::with_capacity(1),
                })
            })
            .collect()
    }

    #[test]
    fn four_runs_of_a_tier_are_merged_the_smallest_first() {
        let numbers = |runs: Option<Vec<Arc<IdRun>>>| {
            runs.map(|runs| runs.iter().map(|run| run.run).collect::<Vec<_>>())
        };
        assert_eq!(numbers(merge_candidates(&runs_of(&[100, 100, 100]))), None);
        assert_eq!(
            numbers(merge_candidates(&runs_of(&[100, 5000, 70, 120, 90, 110]))),
            Some(vec![2, 4, 0, 5])
        );
        // Tier 3 (64..256) has three, tier 6 four: the larger ones merge.
        assert_eq!(
            numbers(merge_candidates(&runs_of(&[
                100, 5000, 5000, 5000, 5000, 100, 100
            ]))),
            Some(vec![1, 2, 3, 4])
        );
    }
}
