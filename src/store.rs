//! The log: the [`EventStore`] trait every backend implements, the live feed
//! of commits ([`LivePublisher`] publishes it), and the rules the backends
//! share (input checks, idempotent retries), public so that a backend
//! written outside the crate implements the same contract.
//! Backends: [`SledStore`] on disk, [`PostgresStore`] for several
//! processes and [`MemoryStore`] for tests.

pub(crate) mod bulk;
mod lease;
pub(crate) mod memory;
pub(crate) mod postgres;
mod read_model;
mod request;
pub(crate) mod sled;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::error::InvalidInput;
use crate::event::validate_name;

pub use self::lease::CheckpointLease;
pub(crate) use self::request::ask;

pub use self::memory::MemoryStore;
pub use self::postgres::{
    PostgresConfig, PostgresStats, PostgresStore, PostgresTransaction, MAX_SCHEMA_NAME_LEN,
    POSTGRES_FORMAT_VERSION,
};
pub use self::read_model::{FromKey, Key, ReadModelStore, Unordered};
pub use self::sled::{
    Durability, SledStore, SledStoreConfig, StoreStats, UpgradeSummary, FORMAT_VERSION,
};
pub use self::sled::{ReadModelBatch, ReadModelView};
pub use crate::error::{AppendError, BackendError, ReadError, ReadModelError, StoreError};
pub use crate::event::{
    validate_append, AppendResult, EventFilter, ExpectedVersion, Metadata, NewEvent, Position,
    ReadDirection, RecordedEvent, Snapshot, StreamId, Version, DEFAULT_MAX_EVENT_SIZE,
    MAX_EVENTS_PER_APPEND, MAX_EVENT_TYPE_LEN, MAX_STREAM_ID_LEN,
};

/// The longest checkpoint name, in bytes.
pub const MAX_CHECKPOINT_NAME_LEN: usize = 256;
/// Commits the live feed keeps for a slow subscriber before it lags.
pub const DEFAULT_LIVE_FEED_CAPACITY: usize = 4096;

/// An append-only log of streams of events.
///
/// Every backend guarantees:
/// - an append commits all of its events or none, with versions `n+1..`
///   and global positions with no gap, in commit order;
/// - a wrong [`ExpectedVersion`] fails with
///   [`AppendError::WrongExpectedVersion`] and writes nothing;
/// - an append whose event ids are all stored already, on the same stream at
///   consecutive versions, returns the original [`AppendResult`] and writes
///   nothing (a retried request is not duplicated); a partial overlap is
///   [`AppendError::DuplicateEventId`];
/// - bad input gets [`InvalidInput`] and writes nothing;
/// - every committed event is published on the [`LiveFeed`] after it is
///   readable, in position order.
///
/// Durability depends on the backend; see [`SledStore`].
#[async_trait]
pub trait EventStore: Send + Sync + fmt::Debug + 'static {
    /// Appends `events` to `stream` if its version satisfies `expected`.
    /// Returns once the events are committed (for the sled store, with its
    /// default durability, once they are on disk).
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, AppendError>;

    /// Reads up to `limit` events of one stream, starting at version `from`
    /// (inclusive) and going in `direction`. Reading forward from
    /// [`Version::FIRST`] gives the whole stream; backward from
    /// [`Version::MAX`] gives the newest first.
    async fn read_stream(
        &self,
        stream: &StreamId,
        from: Version,
        direction: ReadDirection,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError>;

    /// The stream's current version ([`Version::NONE`] if it has no events),
    /// without reading its events.
    async fn stream_version(&self, stream: &StreamId) -> Result<Version, ReadError>;

    /// Reads up to `limit` events of the whole log that pass `filter`,
    /// starting at position `from` (inclusive), in `direction`.
    ///
    /// Like every read, it returns acknowledged events only (up to
    /// [`EventStore::head_position`] when it starts), never one of a group
    /// commit still on its way to the disk. On the sled store, a
    /// [`EventFilter::Stream`] read goes through the stream's index, so it
    /// costs what the stream's length does, not the log's; the other
    /// filters scan the log from `from`.
    async fn read_all(
        &self,
        from: Position,
        direction: ReadDirection,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, ReadError>;

    /// The committed event whose id is `event_id`, if any (an event of an
    /// append still on its way to the disk is not found). The runtime uses
    /// it to recognise a command that already ran
    /// ([`crate::CommandContext::with_command_id`]).
    ///
    /// The default scans the whole log from the end, which costs what the
    /// log's length does; every backend of this crate answers from its
    /// event-id index instead, and an outside backend should too.
    ///
    /// # Errors
    /// The store's.
    async fn read_event(&self, event_id: Uuid) -> Result<Option<RecordedEvent>, ReadError> {
        let mut from = Position::END;
        loop {
            let page = self
                .read_all(from, ReadDirection::Backward, 1024, &EventFilter::All)
                .await?;
            if let Some(found) = page.iter().find(|event| event.event_id == event_id) {
                return Ok(Some(found.clone()));
            }
            match page.last() {
                Some(last) if last.position > Position(1) => from = Position(last.position.0 - 1),
                _ => return Ok(None),
            }
        }
    }

    /// The position of the last committed event ([`Position::START`] when
    /// the log is empty). Every event up to it is readable.
    fn head_position(&self) -> Position;

    /// Subscribes to commits from now on. Events committed before this call
    /// are not delivered; read them with [`EventStore::read_all`] (the
    /// subscriptions of [`crate::projection::subscribe`] do both without a gap).
    fn subscribe_live(&self) -> LiveFeed;

    /// Saves `snapshot` as the latest snapshot of `stream`, replacing one
    /// at a lower version. One at the same or a higher version is kept and
    /// this call does nothing: an actor that stopped late must not replace
    /// a newer actor's snapshot with its older one (a snapshot is only a
    /// cache, so that would cost a longer replay, not a wrong state). A
    /// stored record that does not decode is replaced.
    ///
    /// # Errors
    /// [`StoreError::Closed`] after [`EventStore::shutdown`]; the store's.
    async fn save_snapshot(&self, stream: &StreamId, snapshot: Snapshot) -> Result<(), StoreError>;

    /// Loads the latest snapshot of `stream`, if any.
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, ReadError>;

    /// Deletes the snapshot of `stream`, if any.
    ///
    /// # Errors
    /// [`StoreError::Closed`] after [`EventStore::shutdown`]; the store's.
    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), StoreError>;

    /// Saves a named position (a projection's checkpoint). Durable under the
    /// store's durability once this returns.
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError>;

    /// Loads a named position, if saved.
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, ReadError>;

    /// Stops accepting writes, finishes the queued ones and flushes. Later
    /// appends, snapshot writes and checkpoint saves fail with
    /// [`StoreError::Closed`]; later
    /// reads either still work or fail with
    /// [`StoreError::Closed`], depending on the backend (the sled store
    /// releases its files, so its reads fail). The live feed ends after the
    /// last commit. Calling it twice is fine.
    ///
    /// # Errors
    /// [`StoreError::Poisoned`] (sled store) when a write had failed, or the
    /// final flush fails: what is on disk is then the last durable prefix,
    /// which reopening recovers.
    async fn shutdown(&self) -> Result<(), StoreError>;

    /// Takes the right to run the projection (and own the checkpoint)
    /// `name` in every process that shares this store, for as long as the
    /// returned lease lives. `Ok(None)`: another process holds it now.
    ///
    /// A store shared across processes fences the holder's checkpoint
    /// writes ([`EventStore::save_checkpoint`], and
    /// [`ReadModelStore::commit`]): once another process has taken the
    /// lease, they fail with [`StoreError::LeaseLost`] and write nothing, so
    /// a runner that lost its lease can never move the checkpoint. The
    /// default, for a store that one process owns: a
    /// [`CheckpointLease::local`] that holds nothing (a projection's
    /// in-process name lease already excludes a second runner).
    ///
    /// # Errors
    /// [`StoreError::InvalidInput`] for a bad name; the backend's.
    async fn lease_checkpoint(&self, name: &str) -> Result<Option<CheckpointLease>, StoreError> {
        validate_checkpoint_name(name)?;
        Ok(Some(CheckpointLease::local()))
    }

    /// Whether other processes may append to this store too (PostgreSQL),
    /// so that a stream's actor can fall behind without a conflict telling
    /// it yet: the runtime then follows the live feed and passivates an
    /// idle actor whose stream another process wrote. Default `false`.
    fn shared_by_processes(&self) -> bool {
        false
    }

    /// Whether the store's writer takes appends now, for health checks
    /// ([`crate::Runtime::health`]). It answers from memory, at once, and
    /// writes nothing. The default, for a backend that cannot tell, is
    /// [`WriterStatus::Unknown`].
    fn writer_status(&self) -> WriterStatus {
        WriterStatus::Unknown
    }
}

/// Whether a store's writer takes appends, from
/// [`EventStore::writer_status`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriterStatus {
    /// The writer runs and takes appends; no failure that makes it refuse
    /// writes is known. (A PostgreSQL writer whose database is down is
    /// still `Running`: its next append fails and is retried, not refused
    /// for good. [`crate::Runtime::health`] reports recent append
    /// failures beside this.)
    Running,
    /// A write failed: the store refuses every write until it is reopened
    /// (the sled store's poisoned state). Carries the failure.
    Failed(String),
    /// The store was shut down, or its writer stopped.
    Closed,
    /// The backend does not say.
    Unknown,
}

impl WriterStatus {
    /// Whether appends can succeed now (`Unknown` counts as writable).
    pub fn is_writable(&self) -> bool {
        matches!(self, WriterStatus::Running | WriterStatus::Unknown)
    }
}

/// Checks a checkpoint name as every backend must before saving or loading
/// it: not empty, at most [`MAX_CHECKPOINT_NAME_LEN`] bytes, no control
/// character.
///
/// # Errors
/// The [`InvalidInput`] naming what is wrong.
pub fn validate_checkpoint_name(name: &str) -> Result<(), InvalidInput> {
    validate_name("checkpoint name", name, MAX_CHECKPOINT_NAME_LEN)
}

/// Refuses a read limit of zero, which would make paging loops spin; every
/// backend checks its read limits with it.
///
/// # Errors
/// [`InvalidInput::ZeroLimit`] for 0.
pub fn validate_limit(limit: usize) -> Result<(), InvalidInput> {
    if limit == 0 {
        return Err(InvalidInput::ZeroLimit);
    }
    Ok(())
}

/// The events committed together by one group commit, in position order.
pub type Commit = Arc<[RecordedEvent]>;

/// Why [`LiveFeed::recv`] returned no commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FeedError {
    /// The subscriber fell behind and this many commits were dropped for it.
    /// It must re-read from the store from its last position.
    #[error("the subscriber lagged; {0} commits were dropped for it")]
    Lagged(u64),
    /// The store shut down.
    #[error("the store shut down")]
    Closed,
}

/// A subscription to commits as they happen.
///
/// The feed never makes an append wait and holds a bounded number of
/// commits: a subscriber that falls behind gets [`FeedError::Lagged`] and
/// must catch up from the store.
#[derive(Debug)]
pub struct LiveFeed {
    receiver: broadcast::Receiver<Commit>,
}

impl LiveFeed {
    /// The next commit, in position order.
    ///
    /// # Errors
    /// [`FeedError::Lagged`] when commits were dropped for this subscriber
    /// (later calls continue with the oldest commit still kept), and
    /// [`FeedError::Closed`] when the store shut down.
    pub async fn recv(&mut self) -> Result<Commit, FeedError> {
        self.receiver.recv().await.map_err(|error| match error {
            broadcast::error::RecvError::Lagged(n) => FeedError::Lagged(n),
            broadcast::error::RecvError::Closed => FeedError::Closed,
        })
    }
}

/// The publishing side of the live feed, for backends: it keeps the head
/// position and broadcasts commits to every [`LiveFeed`]. A backend (in
/// this crate or outside it) holds one, answers
/// [`EventStore::head_position`] with [`LivePublisher::head`] and
/// [`EventStore::subscribe_live`] with [`LivePublisher::subscribe`].
///
/// Guarantees, given that the backend calls [`LivePublisher::publish`]
/// only with commits whose events are readable, in position order, each
/// starting right after the previous one's last position:
/// - the head moves to a commit's last position before the commit is sent,
///   so a subscriber that reads the head after subscribing gets every later
///   event from its feed (what `Subscription` relies on to switch from
///   reading to the feed without a gap);
/// - a publish never waits for a subscriber: one that falls more than the
///   capacity behind gets [`FeedError::Lagged`];
/// - after [`LivePublisher::close`], each subscriber gets the commits it
///   still holds, then [`FeedError::Closed`]; later subscribers get
///   [`FeedError::Closed`] at once.
#[derive(Debug)]
pub struct LivePublisher {
    /// `None` once closed: dropping the sender ends every subscription with
    /// [`FeedError::Closed`] after the commits it holds.
    /// A std Mutex, not a tokio one: no await happens while it is held.
    sender: Mutex<Option<broadcast::Sender<Commit>>>,
    head: AtomicU64,
}

impl LivePublisher {
    /// A publisher whose subscribers each keep up to `capacity` commits
    /// (at least one: a capacity of 0 keeps one), with the head at `head`
    /// (the last committed position, [`Position::START`] for an empty log).
    pub fn new(capacity: usize, head: Position) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self {
            sender: Mutex::new(Some(sender)),
            head: AtomicU64::new(head.0),
        }
    }

    fn sender(&self) -> std::sync::MutexGuard<'_, Option<broadcast::Sender<Commit>>> {
        // Nothing can panic while the lock is held.
        self.sender.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last position published (or given to [`LivePublisher::new`]).
    pub fn head(&self) -> Position {
        Position(self.head.load(Ordering::Acquire))
    }

    /// Moves the head to the commit's last position, then sends the commit
    /// to every subscriber. Call it only once the commit's events are
    /// readable, in position order; an empty commit is ignored. After
    /// [`LivePublisher::close`] the head still moves but nothing is sent.
    pub fn publish(&self, commit: Commit) {
        if let Some(last) = commit.last() {
            self.head.store(last.position.0, Ordering::Release);
            if let Some(sender) = &*self.sender() {
                // No subscriber is not an error: the events are in the store.
                let _ = sender.send(commit);
            }
        }
    }

    /// A feed of the commits published from now on; closed from the start
    /// after [`LivePublisher::close`].
    pub fn subscribe(&self) -> LiveFeed {
        let receiver = match &*self.sender() {
            Some(sender) => sender.subscribe(),
            // Shut down: a feed that is closed from the start.
            None => broadcast::channel(1).1,
        };
        LiveFeed { receiver }
    }

    /// Ends every feed: subscribers get the commits they hold, then
    /// [`FeedError::Closed`]. Call it when the store shuts down, after its
    /// last commit was published. Calling it twice is fine.
    pub fn close(&self) {
        self.sender().take();
    }
}

/// Where an event id is already stored, as a backend's lookup for
/// [`check_idempotency`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredId {
    /// The stream the event is stored on.
    pub stream: StreamId,
    /// Its version in that stream.
    pub version: Version,
    /// Its global position.
    pub position: Position,
}

impl StoredId {
    /// An event id stored on `stream` at `version` and `position`.
    pub fn new(stream: StreamId, version: Version, position: Position) -> Self {
        Self {
            stream,
            version,
            position,
        }
    }
}

/// What [`check_idempotency`] decided for an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyCheck {
    /// No event id is stored: append normally.
    New,
    /// Every id is stored on this stream at consecutive versions and
    /// positions, in the append's order: the append is a retry; answer with
    /// this, the original result, and write nothing.
    Retry(AppendResult),
}

/// The idempotency rule every backend applies before an append, so that a
/// retried request is never duplicated (see [`EventStore`]).
///
/// `lookup` tells where an event id is already stored (`Ok(None)`: not
/// stored); the backend must answer from the same state it then appends
/// to (under its lock, in its transaction, or in its single writer),
/// counting appends earlier in the same group commit if it has any. The
/// result is:
/// - `Err(e)` when a lookup failed;
/// - `Ok(Ok(IdempotencyCheck::New))` when no id is stored;
/// - `Ok(Ok(IdempotencyCheck::Retry(result)))` when every id is stored on
///   `stream` at consecutive versions and positions, in order;
/// - `Ok(Err(AppendError::DuplicateEventId { .. }))` otherwise (a partial
///   overlap, another stream, another order): the backend writes nothing.
///
/// # Errors
/// The first error of `lookup`.
pub fn check_idempotency<E>(
    stream: &StreamId,
    events: &[NewEvent],
    mut lookup: impl FnMut(Uuid) -> Result<Option<StoredId>, E>,
) -> Result<Result<IdempotencyCheck, AppendError>, E> {
    let mut found: Vec<StoredId> = Vec::new();
    for (index, event) in events.iter().enumerate() {
        match lookup(event.event_id)? {
            Some(stored) => {
                if found.len() != index {
                    return Ok(Err(partial(event.event_id)));
                }
                if &stored.stream != stream {
                    return Ok(Err(AppendError::DuplicateEventId {
                        event_id: event.event_id,
                        reason: "it is stored on another stream",
                    }));
                }
                if let Some(previous) = found.last() {
                    if stored.version.0 != previous.version.0 + 1
                        || stored.position.0 != previous.position.0 + 1
                    {
                        return Ok(Err(AppendError::DuplicateEventId {
                            event_id: event.event_id,
                            reason: "the stored events are not in the same order",
                        }));
                    }
                }
                found.push(stored);
            }
            None if !found.is_empty() => return Ok(Err(partial(events[0].event_id))),
            None => {}
        }
    }
    Ok(Ok(match (found.first(), found.last()) {
        (Some(first), Some(last)) => IdempotencyCheck::Retry(AppendResult {
            first_version: first.version,
            last_version: last.version,
            first_position: first.position,
            last_position: last.position,
        }),
        _ => IdempotencyCheck::New,
    }))
}

fn partial(event_id: Uuid) -> AppendError {
    AppendError::DuplicateEventId {
        event_id,
        reason: "only part of the append is already stored",
    }
}
