//! An in-memory [`EventStore`]: the same rules as the sled store, nothing on
//! disk. For tests and for trying things out.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use uuid::Uuid;

use crate::error::{AppendError, ReadError, StoreError};
use crate::event::{
    now_micros, validate_append, AppendResult, EventFilter, ExpectedVersion, NewEvent, Position,
    ReadDirection, RecordedEvent, Snapshot, StreamId, Version, DEFAULT_MAX_EVENT_SIZE,
};
use crate::store::{
    check_idempotency, validate_checkpoint_name, validate_limit, EventStore, IdempotencyCheck,
    LiveFeed, LivePublisher, StoredId, DEFAULT_LIVE_FEED_CAPACITY,
};

/// An event store held in memory. Everything is lost when it is dropped.
///
/// Appends are serialized by one lock, so versions and positions follow
/// the same rules as [`SledStore`](crate::SledStore).
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    feed: LivePublisher,
    max_event_size: usize,
}

#[derive(Debug, Default)]
struct Inner {
    /// Every event; `log[i]` has position `i + 1`.
    log: Vec<RecordedEvent>,
    /// Per stream, the indexes into `log` of its events, in version order.
    streams: HashMap<StreamId, Vec<usize>>,
    ids: HashMap<Uuid, usize>,
    snapshots: HashMap<StreamId, Snapshot>,
    checkpoints: HashMap<String, Position>,
    closed: bool,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store with the default limits.
    pub fn new() -> Self {
        Self::with_limits(DEFAULT_MAX_EVENT_SIZE, DEFAULT_LIVE_FEED_CAPACITY)
    }

    /// An empty store with this maximum event size and live feed capacity.
    pub fn with_limits(max_event_size: usize, live_feed_capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            feed: LivePublisher::new(live_feed_capacity, Position::START),
            max_event_size,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while the lock is held cannot leave a half-applied append:
        // every append validates first and mutates only after.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl EventStore for MemoryStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, AppendError> {
        validate_append(&events, self.max_event_size, "MemoryStore::with_limits")?;
        let mut inner = self.lock();
        if inner.closed {
            return Err(StoreError::Closed.into());
        }
        let check = check_idempotency(stream, &events, |id| {
            Ok::<_, std::convert::Infallible>(inner.ids.get(&id).map(|&index| {
                let event = &inner.log[index];
                StoredId {
                    stream: event.stream_id.clone(),
                    version: event.version,
                    position: event.position,
                }
            }))
        })
        .unwrap_or_else(|never| match never {})?;
        if let IdempotencyCheck::Retry(result) = check {
            return Ok(result);
        }
        let actual = Version(inner.streams.get(stream).map_or(0, |v| v.len() as u64));
        if !expected.accepts(actual) {
            return Err(AppendError::WrongExpectedVersion {
                stream: stream.clone(),
                expected,
                actual,
            });
        }
        let recorded_at_micros = now_micros();
        let first_position = Position(inner.log.len() as u64 + 1);
        let mut committed = Vec::with_capacity(events.len());
        for (offset, event) in events.into_iter().enumerate() {
            let offset = offset as u64;
            committed.push(RecordedEvent {
                event_id: event.event_id,
                stream_id: stream.clone(),
                version: Version(actual.0 + 1 + offset),
                position: Position(first_position.0 + offset),
                event_type: event.event_type,
                schema_version: event.schema_version,
                recorded_at_micros,
                metadata: event.metadata,
                payload: event.payload,
            });
        }
        let result = AppendResult {
            first_version: Version(actual.0 + 1),
            last_version: Version(actual.0 + committed.len() as u64),
            first_position,
            last_position: Position(first_position.0 + committed.len() as u64 - 1),
        };
        for event in &committed {
            let index = inner.log.len();
            inner.ids.insert(event.event_id, index);
            inner.streams.entry(stream.clone()).or_default().push(index);
            inner.log.push(event.clone());
        }
        // Published under the lock so that commits reach the feed in
        // position order; sending on a broadcast channel never waits.
        self.feed.publish(committed.into());
        Ok(result)
    }

    async fn read_event(&self, event_id: Uuid) -> Result<Option<RecordedEvent>, ReadError> {
        let inner = self.lock();
        Ok(inner
            .ids
            .get(&event_id)
            .map(|&index| inner.log[index].clone()))
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: Version,
        direction: ReadDirection,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        validate_limit(limit)?;
        let inner = self.lock();
        let Some(indexes) = inner.streams.get(stream) else {
            return Ok(Vec::new());
        };
        let events = indexes.iter().map(|&i| &inner.log[i]);
        Ok(match direction {
            ReadDirection::Forward => events
                .filter(|e| e.version >= from)
                .take(limit)
                .cloned()
                .collect(),
            ReadDirection::Backward => events
                .rev()
                .filter(|e| e.version <= from)
                .take(limit)
                .cloned()
                .collect(),
        })
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Version, ReadError> {
        Ok(Version(
            self.lock()
                .streams
                .get(stream)
                .map_or(0, |v| v.len() as u64),
        ))
    }

    async fn read_all(
        &self,
        from: Position,
        direction: ReadDirection,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        validate_limit(limit)?;
        let inner = self.lock();
        let matches = |e: &&RecordedEvent| filter.matches(e.stream_id.as_str(), &e.event_type);
        Ok(match direction {
            ReadDirection::Forward => {
                let start = usize::try_from(from.0.saturating_sub(1)).unwrap_or(usize::MAX);
                inner
                    .log
                    .iter()
                    .skip(start)
                    .filter(matches)
                    .take(limit)
                    .cloned()
                    .collect()
            }
            ReadDirection::Backward => {
                let end = usize::try_from(from.0)
                    .unwrap_or(usize::MAX)
                    .min(inner.log.len());
                inner.log[..end]
                    .iter()
                    .rev()
                    .filter(matches)
                    .take(limit)
                    .cloned()
                    .collect()
            }
        })
    }

    fn head_position(&self) -> Position {
        self.feed.head()
    }

    fn subscribe_live(&self) -> LiveFeed {
        self.feed.subscribe()
    }

    async fn save_snapshot(&self, stream: &StreamId, snapshot: Snapshot) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(StoreError::Closed);
        }
        match inner.snapshots.get(stream) {
            Some(stored) if stored.version >= snapshot.version => {}
            _ => {
                inner.snapshots.insert(stream.clone(), snapshot);
            }
        }
        Ok(())
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, ReadError> {
        Ok(self.lock().snapshots.get(stream).cloned())
    }

    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(StoreError::Closed);
        }
        inner.snapshots.remove(stream);
        Ok(())
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        validate_checkpoint_name(name)?;
        self.lock().checkpoints.insert(name.to_owned(), position);
        Ok(())
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, ReadError> {
        validate_checkpoint_name(name)?;
        Ok(self.lock().checkpoints.get(name).copied())
    }

    async fn shutdown(&self) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.closed = true;
        // Under the lock, so that no append publishes after the feed closed.
        self.feed.close();
        Ok(())
    }
}
