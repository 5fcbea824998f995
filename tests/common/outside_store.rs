//! A store written the way a backend outside the crate would write one:
//! only annals' public API, a `Mutex<Vec<..>>` for the log, a
//! [`LivePublisher`] for the live feed and [`BackendError`] for its own
//! failures. The conformance suite runs on it to show that the public SPI
//! is enough to keep the whole `EventStore` contract.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use annals::store::{
    check_idempotency, validate_append, validate_checkpoint_name, validate_limit, AppendError,
    AppendResult, BackendError, EventFilter, IdempotencyCheck, LiveFeed, LivePublisher,
    ReadDirection, ReadError, Snapshot, StoredId,
};
use annals::{
    EventStore, ExpectedVersion, NewEvent, Position, RecordedEvent, StoreError, StreamId, Version,
};
use async_trait::async_trait;

/// The failure this store can report: a lock poisoned by a panic.
#[derive(Debug, thiserror::Error)]
#[error("the outside store's lock was poisoned")]
pub(crate) struct PoisonedLock;

/// The log in a vector; positions are indexes + 1.
#[derive(Debug, Default)]
struct Log {
    events: Vec<RecordedEvent>,
    snapshots: HashMap<StreamId, Snapshot>,
    checkpoints: HashMap<String, Position>,
    closed: bool,
}

/// An `EventStore` built from the public API only.
#[derive(Debug)]
pub(crate) struct OutsideStore {
    log: Mutex<Log>,
    feed: LivePublisher,
    max_event_size: usize,
}

impl OutsideStore {
    /// An empty store with these limits.
    pub(crate) fn new(max_event_size: usize, live_feed_capacity: usize) -> Self {
        Self {
            log: Mutex::new(Log::default()),
            feed: LivePublisher::new(live_feed_capacity, Position::START),
            max_event_size,
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Log>, StoreError> {
        self.log
            .lock()
            .map_err(|_| StoreError::Backend(BackendError::new("outside", PoisonedLock)))
    }

    fn lock_open(&self) -> Result<MutexGuard<'_, Log>, StoreError> {
        let log = self.lock()?;
        if log.closed {
            return Err(StoreError::Closed);
        }
        Ok(log)
    }
}

fn stream_events<'a>(
    log: &'a Log,
    stream: &'a StreamId,
) -> impl Iterator<Item = &'a RecordedEvent> {
    log.events.iter().filter(move |e| &e.stream_id == stream)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[async_trait]
impl EventStore for OutsideStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, AppendError> {
        validate_append(&events, self.max_event_size, "OutsideStore::new")?;
        let mut log = self.lock_open()?;
        let check = check_idempotency(stream, &events, |id| {
            Ok::<_, StoreError>(
                log.events
                    .iter()
                    .find(|e| e.event_id == id)
                    .map(|e| StoredId::new(e.stream_id.clone(), e.version, e.position)),
            )
        })?;
        if let IdempotencyCheck::Retry(result) = check? {
            return Ok(result);
        }
        let actual = Version(stream_events(&log, stream).count() as u64);
        if !expected.accepts(actual) {
            return Err(AppendError::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual,
            });
        }
        let first_position = log.events.len() as u64 + 1;
        let recorded_at_micros = now_micros();
        let count = events.len() as u64;
        let committed: Vec<RecordedEvent> = events
            .into_iter()
            .zip(0..)
            .map(|(event, offset)| RecordedEvent {
                event_id: event.event_id,
                stream_id: stream.clone(),
                version: Version(actual.0 + 1 + offset),
                position: Position(first_position + offset),
                event_type: event.event_type,
                schema_version: event.schema_version,
                recorded_at_micros,
                metadata: event.metadata,
                payload: event.payload,
            })
            .collect();
        log.events.extend(committed.iter().cloned());
        // Published under the lock: commits reach the feed in position order.
        self.feed.publish(Arc::from(committed));
        Ok(AppendResult {
            first_version: Version(actual.0 + 1),
            last_version: Version(actual.0 + count),
            first_position: Position(first_position),
            last_position: Position(first_position + count - 1),
        })
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: Version,
        direction: ReadDirection,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        validate_limit(limit)?;
        let log = self.lock()?;
        let events = stream_events(&log, stream);
        Ok(match direction {
            ReadDirection::Forward => events
                .filter(|e| e.version >= from)
                .take(limit)
                .cloned()
                .collect(),
            ReadDirection::Backward => {
                let mut older: Vec<_> = events.filter(|e| e.version <= from).cloned().collect();
                older.reverse();
                older.truncate(limit);
                older
            }
        })
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Version, ReadError> {
        let log = self.lock()?;
        Ok(Version(stream_events(&log, stream).count() as u64))
    }

    async fn read_all(
        &self,
        from: Position,
        direction: ReadDirection,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        validate_limit(limit)?;
        let log = self.lock()?;
        let passes = |e: &&RecordedEvent| filter.matches(e.stream_id.as_str(), &e.event_type);
        Ok(match direction {
            ReadDirection::Forward => log
                .events
                .iter()
                .filter(|e| e.position >= from)
                .filter(passes)
                .take(limit)
                .cloned()
                .collect(),
            ReadDirection::Backward => log
                .events
                .iter()
                .rev()
                .filter(|e| e.position <= from)
                .filter(passes)
                .take(limit)
                .cloned()
                .collect(),
        })
    }

    fn head_position(&self) -> Position {
        self.feed.head()
    }

    fn subscribe_live(&self) -> LiveFeed {
        self.feed.subscribe()
    }

    async fn save_snapshot(&self, stream: &StreamId, snapshot: Snapshot) -> Result<(), StoreError> {
        let mut log = self.lock_open()?;
        let newer = log
            .snapshots
            .get(stream)
            .is_some_and(|stored| stored.version >= snapshot.version);
        if !newer {
            log.snapshots.insert(stream.clone(), snapshot);
        }
        Ok(())
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, ReadError> {
        Ok(self.lock()?.snapshots.get(stream).cloned())
    }

    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), StoreError> {
        self.lock_open()?.snapshots.remove(stream);
        Ok(())
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        validate_checkpoint_name(name)?;
        self.lock_open()?
            .checkpoints
            .insert(name.to_owned(), position);
        Ok(())
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, ReadError> {
        validate_checkpoint_name(name)?;
        Ok(self.lock()?.checkpoints.get(name).copied())
    }

    async fn shutdown(&self) -> Result<(), StoreError> {
        self.lock()?.closed = true;
        self.feed.close();
        Ok(())
    }
}
