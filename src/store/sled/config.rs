//! How to open a [`SledStore`](super::SledStore): [`SledStoreConfig`] and
//! the [`Durability`] of an acknowledged append.

use std::path::PathBuf;

use crate::error::{at_least_one, InvalidInput};
use crate::event::DEFAULT_MAX_EVENT_SIZE;
use crate::store::DEFAULT_LIVE_FEED_CAPACITY;

/// The largest `max_event_size` a sled store takes: 1 GiB, well inside a
/// chunk's 32-bit offsets.
const MAX_EVENT_SIZE_LIMIT: usize = 1 << 30;

/// When an append is acknowledged, relative to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// The default. Each group commit is flushed by sled and then made
    /// durable with fdatasync of sled's log file (and fsync of any new blob
    /// files and their directory) before any of its appends is acknowledged.
    /// An acknowledged append survives `kill -9` and power loss.
    #[default]
    Fsync,
    /// sled's own flush only, which on Linux is `sync_file_range`: an
    /// acknowledged append survives `kill -9` of the process, but not a power
    /// loss or kernel crash (file metadata and the drive's cache may not be
    /// on stable storage). Measured to show what the fdatasync costs.
    Flush,
    /// Acknowledged once applied in memory, before any flush; sled flushes in
    /// the background every `flush_every_ms`. A crash loses the appends of at
    /// most the last `flush_every_ms` milliseconds (plus the flush's own
    /// time); what survives is still a prefix of the log with no gap.
    Buffered {
        /// Background flush period in milliseconds.
        flush_every_ms: u64,
    },
}

/// How to open a [`SledStore`](super::SledStore).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SledStoreConfig {
    /// The directory of the store; created if missing.
    pub path: PathBuf,
    /// When appends are acknowledged. Default [`Durability::Fsync`].
    pub durability: Durability,
    /// sled's page cache, in bytes. Default 64 MiB (sled's own is 1 GiB).
    pub cache_capacity_bytes: u64,
    /// The largest event accepted, in bytes. Default 1 MiB, at most 1 GiB
    /// (a chunk addresses its records with 32-bit offsets).
    pub max_event_size: usize,
    /// Commits kept for slow live subscribers before they lag. Default 4096.
    pub live_feed_capacity: usize,
    /// Appends waiting for the writer before `append` waits for room.
    /// Default 65,536.
    pub queue_capacity: usize,
    /// The most appends one group commit takes. Default 8,192.
    pub max_group_commit: usize,
    /// Free space the filesystem must keep, beyond what a group commit adds,
    /// for the writer to commit it; below it appends fail with
    /// [`StoreError::DiskFull`](crate::StoreError::DiskFull) and resume once space is freed. sled 0.34
    /// does not recover from running out of space in the middle of a write
    /// (its flush then never completes), so the store stops before that.
    /// Default 16 MiB; 0 disables the check.
    pub min_free_bytes: u64,
    /// Stream heads the writer keeps in memory to check expected versions
    /// without reading the index (about 100 bytes each). When full it is
    /// emptied and refills; a miss costs one descent of sled's tree.
    /// Default 100,000.
    pub head_cache_capacity: usize,
    /// Opens a store whose log sled recovered shorter than the position it
    /// had acknowledged (damaged files), instead of refusing it with
    /// [`StoreError::ShorterThanAcknowledged`](crate::StoreError::ShorterThanAcknowledged).
    /// The events after the recovered head are lost for good: the store
    /// then records the recovered head as acknowledged, and later opens
    /// check against it. Default `false`.
    pub accept_lost_events: bool,
    /// Events whose stream entries are kept in memory before the indexer
    /// thread writes them to sled in bulk, one key per stream for all of
    /// them (docs/design.md, "The stream index, off the commit path"). Larger takes fewer sled
    /// keys per event, and more memory and more to re-read on an open after
    /// a crash (a clean shutdown writes them all). Default 32,768.
    pub stream_index_flush_events: usize,
}

impl SledStoreConfig {
    /// The defaults, at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            durability: Durability::default(),
            cache_capacity_bytes: 64 << 20,
            max_event_size: DEFAULT_MAX_EVENT_SIZE,
            live_feed_capacity: DEFAULT_LIVE_FEED_CAPACITY,
            queue_capacity: 65_536,
            max_group_commit: 8_192,
            min_free_bytes: 16 << 20,
            head_cache_capacity: 100_000,
            accept_lost_events: false,
            stream_index_flush_events: 32_768,
        }
    }

    /// Sets the durability.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Sets sled's cache capacity in bytes.
    pub fn cache_capacity_bytes(mut self, bytes: u64) -> Self {
        self.cache_capacity_bytes = bytes;
        self
    }

    /// Sets the largest event accepted, in bytes.
    pub fn max_event_size(mut self, bytes: usize) -> Self {
        self.max_event_size = bytes;
        self
    }

    /// Sets how many stream heads the writer keeps in memory (0: none).
    pub fn head_cache_capacity(mut self, streams: usize) -> Self {
        self.head_cache_capacity = streams;
        self
    }

    /// Accepts (or not) opening a store whose log is shorter than it had
    /// acknowledged: see [`SledStoreConfig::accept_lost_events`] (the field).
    pub fn accept_lost_events(mut self, accept: bool) -> Self {
        self.accept_lost_events = accept;
        self
    }

    /// Sets how many events' stream entries are kept in memory before they
    /// are written in bulk: see [`SledStoreConfig::stream_index_flush_events`].
    pub fn stream_index_flush_events(mut self, events: usize) -> Self {
        self.stream_index_flush_events = events;
        self
    }

    /// Sets the free space to keep on the filesystem (0: no check).
    pub fn min_free_bytes(mut self, bytes: u64) -> Self {
        self.min_free_bytes = bytes;
        self
    }

    /// Sets how many commits the live feed keeps for slow subscribers.
    pub fn live_feed_capacity(mut self, commits: usize) -> Self {
        self.live_feed_capacity = commits;
        self
    }

    /// Sets how many appends may wait for the writer.
    pub fn queue_capacity(mut self, appends: usize) -> Self {
        self.queue_capacity = appends;
        self
    }

    /// Sets the most appends one group commit takes.
    pub fn max_group_commit(mut self, appends: usize) -> Self {
        self.max_group_commit = appends;
        self
    }

    /// Checks the settings [`SledStore::open_with`](super::SledStore::open_with) needs: the event size,
    /// the live feed, the queue, the group commit, the stream index's flush
    /// and a buffered flush period must each be at least 1, and the event size at most 1 GiB.
    ///
    /// # Errors
    /// [`InvalidInput::TooSmall`] naming the first setting below it;
    /// [`InvalidInput::TooLarge`] for an event size above 1 GiB.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        at_least_one("max_event_size", self.max_event_size as u64)?;
        if self.max_event_size > MAX_EVENT_SIZE_LIMIT {
            // A chunk's offsets are u32 (docs/design.md, "Tree `log`").
            return Err(InvalidInput::TooLarge {
                what: "max_event_size",
                value: self.max_event_size as u64,
                max: MAX_EVENT_SIZE_LIMIT as u64,
            });
        }
        at_least_one("live_feed_capacity", self.live_feed_capacity as u64)?;
        at_least_one("queue_capacity", self.queue_capacity as u64)?;
        at_least_one("max_group_commit", self.max_group_commit as u64)?;
        at_least_one(
            "stream_index_flush_events",
            self.stream_index_flush_events as u64,
        )?;
        if let Durability::Buffered { flush_every_ms } = self.durability {
            at_least_one("flush_every_ms", flush_every_ms)?;
        }
        Ok(())
    }
}
