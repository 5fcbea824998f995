//! The embedded [`EventStore`] on sled 0.34: one writer thread owns every
//! append and commits them in groups, one flush (and fdatasync) per group.
//! This file holds the [`SledStore`] handle (open, shutdown, stats); the
//! settings are in `config`, the keys and records in `format`, the
//! fdatasync workaround in `durability`, the group commit in `writer` and
//! the read paths in `reads`, as docs/design.md describes them.

mod ack_mark;
mod config;
mod durability;
mod format;
mod id_index;
pub(crate) mod ops;
mod read_model;
mod reads;
mod stream_index;
mod upgrade;
mod writer;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

pub use self::config::{Durability, SledStoreConfig};
pub use self::format::FORMAT_VERSION;
pub use self::read_model::{ReadModelBatch, ReadModelView};
pub use self::upgrade::UpgradeSummary;

use self::durability::Syncer;
use self::format::{corrupt, last_position, stored_head, META_FORMAT, META_HEAD};
use self::writer::{WriteRequest, Writer};
use crate::error::{AppendError, BackendError, ReadError, StoreError};
use crate::event::{
    validate_append, AppendResult, EventFilter, ExpectedVersion, NewEvent, Position, ReadDirection,
    RecordedEvent, Snapshot, StreamId, Version,
};
use crate::store::{ask, validate_checkpoint_name, EventStore, LiveFeed, LivePublisher};

/// The name [`BackendError`]s of this backend carry.
const BACKEND: &str = "sled";

/// A sled error as the store reports it: [`StoreError::Backend`] naming
/// sled, with sled's error as its source.
pub(crate) fn sled_error(error: sled::Error) -> StoreError {
    StoreError::Backend(BackendError::new(BACKEND, error))
}

/// Counters of the writer, for monitoring and for tests of durability.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Appends committed (idempotent retries included).
    pub appends: u64,
    /// Group commits that wrote events.
    pub group_commits: u64,
    /// Completed fdatasyncs of the log file (zero unless the durability is
    /// [`Durability::Fsync`]). Each acknowledged append under `Fsync` was
    /// preceded by one.
    pub durable_syncs: u64,
}

#[derive(Debug, Default)]
struct Counters {
    appends: AtomicU64,
    group_commits: AtomicU64,
    durable_syncs: AtomicU64,
    /// Why the writer refuses writes, once it does (for `writer_status`).
    poisoned: OnceLock<String>,
}

/// The embedded event store on sled.
///
/// One writer thread owns every append: it takes all queued appends as one
/// group, checks each expected version against the stream heads (those
/// moved earlier in the same group, else its cache of committed heads, else
/// the last key of the stream's index), writes the group as one
/// atomic sled batch, flushes once, and only then answers every waiter and
/// publishes the committed events. One flush serves many appends and
/// positions are assigned in commit order, so `$all` has no gap.
///
/// Opening does not scan the log: the last position is stored, and a
/// stream's head is the last key of its index. Dropping the store without
/// [`EventStore::shutdown`] loses nothing that was acknowledged; the writer
/// flushes as it stops.
///
/// Once [`EventStore::shutdown`] has returned, the store holds none of
/// sled's handles, so the directory can be opened again (in this process
/// or another) while this handle is still alive; every later call on it,
/// reads included, fails with [`StoreError::Closed`].
#[derive(Debug)]
pub struct SledStore {
    /// sled's handles; `None` once shut down. sled locks the directory for
    /// as long as any `Db` or `Tree` clone lives, so shutdown must be able
    /// to take them from a store that is still shared. A read takes the
    /// lock shared, uncontended but for shutdown.
    handles: RwLock<Option<Handles>>,
    sender: mpsc::Sender<WriteRequest>,
    feed: Arc<LivePublisher>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Serializes shutdowns, so that every `shutdown()` returns only once
    /// the handles are dropped, also one that loses a race with another.
    shutting_down: tokio::sync::Mutex<()>,
    counters: Arc<Counters>,
    config: SledStoreConfig,
}

/// The store's own sled handles.
#[derive(Debug)]
struct Handles {
    db: sled::Db,
    log: sled::Tree,
    /// The stream index's tail and flushes, shared with the writer.
    streams: Arc<stream_index::StreamIndex>,
    snapshots: sled::Tree,
    checkpoints: sled::Tree,
}

impl SledStore {
    /// Opens (or creates) a store at `path` with the default configuration.
    ///
    /// # Errors
    /// As [`SledStore::open_with`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(SledStoreConfig::new(path.as_ref()))
    }

    /// Opens (or creates) a store. Must be called within a tokio runtime's
    /// context only for the async methods; opening itself blocks.
    ///
    /// # Errors
    /// [`StoreError::InUse`] when another store (of this process or
    /// another) has the directory open and does not close it within half
    /// a second,
    /// [`StoreError::NotAStore`] when the path holds something else,
    /// [`StoreError::FormatMismatch`] for a store of another format,
    /// [`StoreError::Corrupt`] when the files are damaged,
    /// [`StoreError::ShorterThanAcknowledged`] when sled recovered fewer
    /// events than the store had acknowledged (damaged files; see
    /// [`SledStoreConfig::accept_lost_events`]), and
    /// [`StoreError::Backend`] / [`StoreError::Io`] when they cannot be read;
    /// [`StoreError::InvalidInput`] for a setting below its minimum
    /// ([`SledStoreConfig::validate`]), before anything is created.
    pub fn open_with(config: SledStoreConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let path = config.path.clone();
        check_path(&path)?;
        let mut sled_config = sled::Config::new()
            .path(&path)
            .cache_capacity(config.cache_capacity_bytes)
            .mode(sled::Mode::HighThroughput);
        sled_config = match config.durability {
            Durability::Buffered { flush_every_ms } => {
                sled_config.flush_every_ms(Some(flush_every_ms))
            }
            // Flushes happen per group commit; sled's own timer would only
            // add flushes that nobody waits for.
            Durability::Fsync | Durability::Flush => sled_config.flush_every_ms(None),
        };
        let db = open_db(&path, &sled_config)?;
        let log = db.open_tree("log").map_err(sled_error)?;
        let snapshots = db.open_tree("snapshots").map_err(sled_error)?;
        let checkpoints = db.open_tree("checkpoints").map_err(sled_error)?;
        let head = check_format(&path, &db, &log, config.accept_lost_events)?;
        let mark = check_acknowledged(&path, head, &config)?;
        let streams = Arc::new(stream_index::StreamIndex::open(
            &log,
            head,
            config.stream_index_flush_events,
        )?);

        let counters = Arc::new(Counters::default());
        let syncer = Syncer::new(&path, config.durability, Arc::clone(&counters))?;
        let feed = Arc::new(LivePublisher::new(
            config.live_feed_capacity,
            Position(head),
        ));
        let (sender, receiver) = mpsc::channel(config.queue_capacity);
        let writer = Writer {
            db: db.clone(),
            log: log.clone(),
            feed: Arc::clone(&feed),
            receiver,
            last_position: head,
            syncer,
            max_group_commit: config.max_group_commit,
            path: path.clone(),
            min_free_bytes: config.min_free_bytes,
            heads: HashMap::new(),
            head_cache_capacity: config.head_cache_capacity,
            metrics: crate::metrics::StoreMetrics::new(BACKEND),
            mark,
            streams: Arc::clone(&streams),
            indexer: None,
        };
        let writer = std::thread::Builder::new()
            .name("annals-writer".into())
            .spawn(move || writer.run())?;
        debug!(path = %path.display(), head, "opened sled store");
        Ok(Self {
            handles: RwLock::new(Some(Handles {
                db,
                log,
                streams,
                snapshots,
                checkpoints,
            })),
            sender,
            feed,
            writer: Mutex::new(Some(writer)),
            shutting_down: tokio::sync::Mutex::new(()),
            counters,
            config,
        })
    }

    /// What the writer has done so far.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            appends: self.counters.appends.load(Ordering::Relaxed),
            group_commits: self.counters.group_commits.load(Ordering::Relaxed),
            durable_syncs: self.counters.durable_syncs.load(Ordering::Relaxed),
        }
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &SledStoreConfig {
        &self.config
    }

    /// The tree `name` of the store's database, opened (created) if needed.
    /// The caller's clone keeps the directory locked while it lives.
    ///
    /// # Errors
    /// [`StoreError::Closed`] after [`EventStore::shutdown`]; sled's.
    pub(crate) fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        self.with_handles(|handles| handles.db.open_tree(name).map_err(sled_error))
    }

    /// Runs `read` with the store's handles.
    ///
    /// # Errors
    /// [`StoreError::Closed`] after [`EventStore::shutdown`]; `read`'s.
    fn with_handles<T, E: From<StoreError>>(
        &self,
        read: impl FnOnce(&Handles) -> Result<T, E>,
    ) -> Result<T, E> {
        // Nothing panics while the lock is held but `read`, which leaves
        // the handles as they were.
        let handles = self.handles.read().unwrap_or_else(|p| p.into_inner());
        match &*handles {
            Some(handles) => read(handles),
            None => Err(StoreError::Closed.into()),
        }
    }

    /// Makes everything written to the database so far durable, under the
    /// store's durability; shares a group commit with concurrent appends.
    ///
    /// # Errors
    /// [`StoreError`] when the flush fails or the store is shut down.
    pub async fn sync(&self) -> Result<(), StoreError> {
        ask(&self.sender, |reply| WriteRequest::Sync { reply }).await
    }
}

/// Opens sled's database at `path` with `config`.
///
/// A lock held by a handle that is closing (sled closes its files a few
/// milliseconds after its last handle is dropped, see [`wait_for_release`])
/// is waited for, at most [`RELEASE_WAIT`], and the open tried once more: a
/// store reopened right after another was dropped, or the command-line tool
/// run the moment a service stops, opens instead of failing. A lock still
/// held after that is [`StoreError::InUse`].
///
/// # Errors
/// [`StoreError::InUse`] as above; [`StoreError::Corrupt`] when sled
/// panics on damaged files; sled's other errors.
pub(super) fn open_db(path: &Path, config: &sled::Config) -> Result<sled::Db, StoreError> {
    // sled 0.34 panics on some kinds of damaged files; a damaged store is
    // an error for the caller, never a panic in their service.
    let open = || {
        catch_unwind(AssertUnwindSafe(|| config.open()))
            .map_err(|_| corrupt(format_args!("sled panicked opening {}", path.display())))?
            .map_err(|error| open_error(path, error))
    };
    match open() {
        Err(StoreError::InUse { .. }) => {
            wait_for_release(path);
            open()
        }
        other => other,
    }
}

/// sled's error opening `path`, with its lock error made
/// [`StoreError::InUse`]. sled 0.34 reports a held lock only as an
/// `io::ErrorKind::Other` with this message, so the message is what tells.
fn open_error(path: &Path, error: sled::Error) -> StoreError {
    match &error {
        sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock") => {
            StoreError::InUse {
                path: path.to_path_buf(),
            }
        }
        _ => sled_error(error),
    }
}

/// How long [`wait_for_release`] waits for sled to let go of the directory.
const RELEASE_WAIT: Duration = Duration::from_millis(500);

/// Waits until nothing holds the directory's lock, for at most
/// [`RELEASE_WAIT`]. sled 0.34 closes its files a few milliseconds after
/// its last handle is dropped (a task of its I/O thread pool may still
/// hold them) and says nothing when it does, so the lock itself is asked,
/// the way sled takes it. Handles other layers still hold (read-model
/// trees) keep it locked: then this gives up at the bound.
fn wait_for_release(path: &Path) {
    let deadline = Instant::now() + RELEASE_WAIT;
    loop {
        let free = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path.join("db"))
        {
            // Taking the lock and closing the file releases it again.
            Ok(file) => fs4::FileExt::try_lock(&file).is_ok(),
            // Gone or unreadable: nothing of ours holds it.
            Err(_) => true,
        };
        if free || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Checks the format record of an opened store and returns its head
/// position; writes the format of a new, empty one.
fn check_format(
    path: &Path,
    db: &sled::Db,
    log: &sled::Tree,
    accept_lost_events: bool,
) -> Result<u64, StoreError> {
    let Some(found) = log.get(META_FORMAT).map_err(sled_error)? else {
        if !log.is_empty() || db.tree_names().len() > 4 || !db.is_empty() {
            return Err(StoreError::NotAStore(path.display().to_string()));
        }
        log.insert(META_FORMAT, &FORMAT_VERSION.to_be_bytes())
            .map_err(sled_error)?;
        log.insert(META_HEAD, &0u64.to_be_bytes())
            .map_err(sled_error)?;
        log.insert(format::META_INDEXED, &0u64.to_be_bytes())
            .map_err(sled_error)?;
        db.flush().map_err(sled_error)?;
        return Ok(0);
    };
    let found = u32::from_be_bytes(
        found
            .as_ref()
            .try_into()
            .map_err(|_| corrupt("format version record"))?,
    );
    if found != FORMAT_VERSION {
        return Err(StoreError::FormatMismatch {
            found,
            expected: FORMAT_VERSION,
        });
    }
    if let Some(from) = upgrade::upgrading_from(log)? {
        // An upgrade that has not finished: running it again finishes it
        // (`SledStore::upgrade`).
        return Err(StoreError::FormatMismatch {
            found: from,
            expected: FORMAT_VERSION,
        });
    }
    let head = stored_head(log)?;
    let last = settle_head(path, log, head, accept_lost_events, "opening")?;
    if last < head {
        log.insert(META_HEAD, &last.to_be_bytes())
            .map_err(sled_error)?;
        db.flush().map_err(sled_error)?;
    }
    Ok(last)
}

/// Where the log of `path` really ends, given its stored `head`: the last
/// event's position (O(log n), not a scan). A head past the last event is
/// part of a group that was never answered: sled 0.34, run out of space in
/// the group's flush, can recover its `Mhead` without its chunk (measured:
/// `tests/full_disk.rs`). What is missing is a loss only if it was
/// acknowledged, which the mark tells (then `ShorterThanAcknowledged`, or
/// accepted; `doing` names what is under way); otherwise the caller moves
/// the head back to the returned last event. An event past the head is
/// corruption.
pub(super) fn settle_head(
    path: &Path,
    log: &sled::Tree,
    head: u64,
    accept_lost_events: bool,
    doing: &str,
) -> Result<u64, StoreError> {
    let last = last_position(log)?;
    if last > head {
        return Err(corrupt(format_args!(
            "stored head position {head} but last event at {last}"
        )));
    }
    if last < head {
        ack_mark::check(path, last, accept_lost_events, doing)?;
        warn!(
            path = %path.display(), stored = head, last,
            "the stored head is past the last event, which no answer covered; {doing} at the last event"
        );
    }
    Ok(last)
}

/// Refuses a log that sled recovered shorter than the store had
/// acknowledged (docs/design.md, "The acknowledged mark"), unless the
/// config accepts the loss, which then lowers the mark durably. Returns the
/// mark for the writer to keep up to date (`None` under
/// [`Durability::Buffered`], whose acknowledgements promise no durability).
fn check_acknowledged(
    path: &Path,
    head: u64,
    config: &SledStoreConfig,
) -> Result<Option<ack_mark::AckMark>, StoreError> {
    let acknowledged = ack_mark::check(path, head, config.accept_lost_events, "opening")?;
    match config.durability {
        Durability::Buffered { .. } => Ok(None),
        Durability::Fsync | Durability::Flush => Ok(Some(ack_mark::AckMark::open(
            path,
            acknowledged.map_or(0, |a| a.min(head)),
        )?)),
    }
}

/// Refuses paths that hold something other than a sled directory.
fn check_path(path: &Path) -> Result<(), StoreError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
        Ok(meta) if !meta.is_dir() => Err(StoreError::NotAStore(path.display().to_string())),
        Ok(_) => {
            let mut entries = std::fs::read_dir(path)?;
            let empty = entries.next().is_none();
            if empty || path.join("db").is_file() && path.join("conf").is_file() {
                Ok(())
            } else {
                Err(StoreError::NotAStore(path.display().to_string()))
            }
        }
    }
}

impl Drop for SledStore {
    /// Without [`EventStore::shutdown`], closes the writer's queue and waits
    /// for its final flush. Otherwise a program that exits right after the
    /// drop kills the writer before that flush and loses appends already
    /// acknowledged in [`Durability::Buffered`] mode, and the writer would
    /// keep sled's files open after the store is gone. This blocks the
    /// dropping thread for one flush; `shutdown()` avoids that.
    fn drop(&mut self) {
        let handle = self
            .writer
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = handle {
            // The store holds the only sender: dropping it ends the writer's
            // loop, which commits what is queued, flushes and returns.
            let (closed, _) = mpsc::channel(1);
            drop(std::mem::replace(&mut self.sender, closed));
            let _ = handle.join();
        }
    }
}

#[async_trait]
impl EventStore for SledStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, AppendError> {
        validate_append(
            &events,
            self.config.max_event_size,
            "SledStoreConfig::max_event_size",
        )?;
        ask(&self.sender, |reply| WriteRequest::Append {
            stream: stream.clone(),
            expected,
            events,
            reply,
        })
        .await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: Version,
        direction: ReadDirection,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.with_handles(|handles| {
            reads::read_stream(handles, self.feed.head(), stream, from, direction, limit)
        })
    }

    async fn read_event(&self, event_id: uuid::Uuid) -> Result<Option<RecordedEvent>, ReadError> {
        self.with_handles(|handles| reads::read_by_id(handles, self.feed.head(), event_id))
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Version, ReadError> {
        self.with_handles(|handles| reads::stream_version(handles, self.feed.head(), stream))
    }

    async fn read_all(
        &self,
        from: Position,
        direction: ReadDirection,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.with_handles(|handles| {
            reads::read_all(handles, self.feed.head(), from, direction, limit, filter)
        })
    }

    fn writer_status(&self) -> crate::store::WriterStatus {
        use crate::store::WriterStatus;
        if let Some(why) = self.counters.poisoned.get() {
            WriterStatus::Failed(why.clone())
        } else if self.sender.is_closed() {
            WriterStatus::Closed
        } else {
            WriterStatus::Running
        }
    }

    fn head_position(&self) -> Position {
        self.feed.head()
    }

    fn subscribe_live(&self) -> LiveFeed {
        self.feed.subscribe()
    }

    async fn save_snapshot(&self, stream: &StreamId, snapshot: Snapshot) -> Result<(), StoreError> {
        if self.sender.is_closed() {
            return Err(StoreError::Closed);
        }
        self.with_handles(|handles| reads::save_snapshot(handles, stream, &snapshot))
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, ReadError> {
        self.with_handles(|handles| reads::load_snapshot(handles, stream))
    }

    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), StoreError> {
        if self.sender.is_closed() {
            return Err(StoreError::Closed);
        }
        self.with_handles(|handles| {
            handles
                .snapshots
                .remove(stream.as_str())
                .map_err(sled_error)?;
            Ok(())
        })
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        validate_checkpoint_name(name)?;
        self.with_handles(|handles| {
            handles
                .checkpoints
                .insert(name, &position.0.to_be_bytes())
                .map_err(sled_error)
        })?;
        self.sync().await
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, ReadError> {
        validate_checkpoint_name(name)?;
        self.with_handles(|handles| reads::load_checkpoint(handles, name))
    }

    /// Commits what is queued, flushes, stops the writer and drops the
    /// store's sled handles: once it returns, the directory is free for
    /// another open (unless other layers still hold trees of it), and
    /// every later call on this
    /// store fails with [`StoreError::Closed`].
    async fn shutdown(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.shutting_down.lock().await;
        let (reply, answer) = oneshot::channel();
        let result = match self.sender.send(WriteRequest::Shutdown { reply }).await {
            Ok(()) => answer.await.unwrap_or(Ok(())),
            Err(_) => Ok(()), // already shut down
        };
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            // The writer has answered the shutdown and only returns now;
            // its own sled handles go with it.
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        let handles = self
            .handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let path = self.config.path.clone();
        // The last handle's drop flushes (nothing is left to write) and
        // stops sled's own threads: blocking work, off the async workers.
        let _ = tokio::task::spawn_blocking(move || {
            drop(handles);
            wait_for_release(&path);
        })
        .await;
        result
    }
}
