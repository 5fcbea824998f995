//! The read paths of the sled store: a stream through its index, the whole
//! log by position, stream versions, and the `snapshots` and `checkpoints`
//! trees (whose writes skip the writer: a snapshot is a cache, and a
//! checkpoint is synced through the writer by the caller). Every read of
//! the log stops at the acknowledged head it is given, never returning an
//! event of a group commit still on its way to the disk.

use tracing::warn;

use super::format::{
    chunk_at, chunk_key, corrupt, decode_u64, event_at, Chunk, RecordDecoder, StoredSnapshot,
};
use super::{sled_error, Handles};
use crate::error::{ReadError, StoreError};
use crate::event::{
    EventFilter, Position, ReadDirection, RecordedEvent, Snapshot, StreamId, Version,
};
use crate::store::validate_limit;

/// The event stored under `event_id`, through the id index, if it is at
/// or before `head`.
pub(super) fn read_by_id(
    handles: &Handles,
    head: Position,
    event_id: uuid::Uuid,
) -> Result<Option<RecordedEvent>, ReadError> {
    let Some(position) = handles.streams.event_position(&handles.log, event_id)? else {
        return Ok(None);
    };
    if position > head.0 {
        return Ok(None);
    }
    // One descent to its chunk, which holds it.
    match event_at(&handles.log, position, &mut RecordDecoder::default())? {
        Some(event) if event.event_id == event_id => Ok(Some(event)),
        _ => Err(corrupt(format_args!(
            "event id {event_id} points at {position}, which holds another"
        ))
        .into()),
    }
}

/// Up to `limit` events of `stream` from version `from` in `direction`,
/// none past `head`.
pub(super) fn read_stream(
    handles: &Handles,
    head: Position,
    stream: &StreamId,
    from: Version,
    direction: ReadDirection,
    limit: usize,
) -> Result<Vec<RecordedEvent>, ReadError> {
    validate_limit(limit)?;
    let log = &handles.log;
    let head = head.0;
    let entries = handles
        .streams
        .entries(log, stream, from.0, direction == ReadDirection::Forward);
    let mut events = Vec::new();
    let mut decoder = RecordDecoder::default();
    // The events of one append share a chunk: the last one read is kept
    // and looked in first.
    let mut last_chunk: Option<Chunk> = None;
    for entry in entries {
        let (_, position) = entry?;
        if position > head {
            // Versions and positions grow together: past the head going
            // forward, nothing more; going backward, older ones follow.
            if direction == ReadDirection::Forward {
                break;
            }
            continue;
        }
        let missing = || corrupt(format_args!("{stream} index points at missing {position}"));
        let cached = last_chunk
            .as_ref()
            .is_some_and(|chunk| chunk.record(position).is_some());
        if !cached {
            last_chunk = Some(chunk_at(log, position)?.ok_or_else(missing)?);
        }
        let chunk = last_chunk.as_ref().expect("just read");
        let record = chunk.record(position).expect("the chunk holds it");
        let event = decoder
            .decode(position, record, &EventFilter::All)?
            .ok_or_else(missing)?;
        events.push(event);
        if events.len() >= limit {
            break;
        }
    }
    Ok(events)
}

/// The last version of `stream` at or below `head`: the tail may hold a
/// group whose head has not moved yet.
pub(super) fn stream_version(
    handles: &Handles,
    head: Position,
    stream: &StreamId,
) -> Result<Version, ReadError> {
    for entry in handles
        .streams
        .entries(&handles.log, stream, u64::MAX, false)
    {
        let (version, position) = entry?;
        if position <= head.0 {
            return Ok(Version(version));
        }
    }
    Ok(Version::NONE)
}

/// Up to `limit` events of the log that pass `filter`, from position
/// `from` in `direction`, none past `head`.
pub(super) fn read_all(
    handles: &Handles,
    head: Position,
    from: Position,
    direction: ReadDirection,
    limit: usize,
    filter: &EventFilter,
) -> Result<Vec<RecordedEvent>, ReadError> {
    validate_limit(limit)?;
    if let EventFilter::Stream(stream) = filter {
        // Through the stream's index: the cost follows the stream, not
        // the log. `read_stream` stops at the head as this does.
        return match version_at_position(handles, stream, from, direction)? {
            Some(version) => read_stream(handles, head, stream, version, direction, limit),
            None => Ok(Vec::new()),
        };
    }
    let log = &handles.log;
    let head = head.0;
    let mut events = Vec::with_capacity(limit.min(4096));
    let mut decoder = RecordDecoder::default();
    let mut push = |chunk: &Chunk, position: u64| -> Result<bool, ReadError> {
        let record = chunk.record(position).expect("a position of the chunk");
        if let Some(event) = decoder.decode(position, record, filter)? {
            events.push(event);
        }
        Ok(events.len() < limit)
    };
    match direction {
        ReadDirection::Forward => {
            let from = from.0.max(1);
            if from > head {
                return Ok(Vec::new());
            }
            // From the chunk that holds `from`, which may start before it.
            let start = chunk_at(log, from)?.map_or(from, |chunk| chunk.first());
            'chunks: for entry in log.range(chunk_key(start)..=chunk_key(head)) {
                let (key, value) = entry.map_err(sled_error)?;
                let chunk = Chunk::parse(&key, value)?;
                for position in chunk.first().max(from)..=chunk.last().min(head) {
                    if !push(&chunk, position)? {
                        break 'chunks;
                    }
                }
            }
        }
        ReadDirection::Backward => {
            let top = from.0.min(head);
            'chunks: for entry in log.range(chunk_key(0)..=chunk_key(top)).rev() {
                let (key, value) = entry.map_err(sled_error)?;
                let chunk = Chunk::parse(&key, value)?;
                for position in (chunk.first()..=chunk.last().min(top)).rev() {
                    if !push(&chunk, position)? {
                        break 'chunks;
                    }
                }
            }
        }
    }
    Ok(events)
}

/// The version of `stream`'s first event at or after `from` (going
/// forward), or its last one at or before it (going backward): positions
/// grow with versions, so a binary search over the index, O(log n) gets.
/// `None` when there is none.
fn version_at_position(
    handles: &Handles,
    stream: &StreamId,
    from: Position,
    direction: ReadDirection,
) -> Result<Option<Version>, StoreError> {
    let (log, streams) = (&handles.log, &handles.streams);
    let position_of = |version: u64| -> Result<u64, StoreError> {
        streams
            .position_of(log, stream, version)?
            .ok_or_else(|| corrupt(format_args!("{stream} index misses version {version}")))
    };
    // The first version whose position is at or after `from`, in 1..=last+1.
    let last = streams.head(log, stream)?;
    let (mut low, mut high) = (1, last + 1);
    while low < high {
        let middle = low + (high - low) / 2;
        if position_of(middle)? < from.0 {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    Ok(match direction {
        ReadDirection::Forward => (low <= last).then_some(Version(low)),
        // At `from` itself, or the one before the first past it.
        ReadDirection::Backward if low <= last && position_of(low)? == from.0 => Some(Version(low)),
        ReadDirection::Backward => (low > 1).then(|| Version(low - 1)),
    })
}

/// Saves `snapshot` unless one at the same or a higher version is stored.
pub(super) fn save_snapshot(
    handles: &Handles,
    stream: &StreamId,
    snapshot: &Snapshot,
) -> Result<(), StoreError> {
    let bytes = postcard::to_stdvec(&StoredSnapshot {
        version: snapshot.version.0,
        payload: &snapshot.payload,
    })
    .map_err(corrupt)?;
    // Not synced on its own: a snapshot is a cache, and the next group
    // commit flushes it. Losing it in a crash costs a longer replay.
    // Compare-and-swap, so that of two racing saves the newer stays; a
    // stored snapshot at the same or a higher version is left as it is,
    // not rewritten.
    let key = stream.as_str();
    loop {
        let stored = handles.snapshots.get(key).map_err(sled_error)?;
        let newer_stored = stored.as_ref().is_some_and(|stored| {
            postcard::from_bytes::<StoredSnapshot<'_>>(stored)
                .is_ok_and(|stored| stored.version >= snapshot.version.0)
        });
        if newer_stored {
            return Ok(());
        }
        if handles
            .snapshots
            .compare_and_swap(key, stored, Some(bytes.as_slice()))
            .map_err(sled_error)?
            .is_ok()
        {
            return Ok(());
        }
    }
}

/// The snapshot of `stream`; a record that does not decode counts as none.
pub(super) fn load_snapshot(
    handles: &Handles,
    stream: &StreamId,
) -> Result<Option<Snapshot>, ReadError> {
    let Some(bytes) = handles.snapshots.get(stream.as_str()).map_err(sled_error)? else {
        return Ok(None);
    };
    match postcard::from_bytes::<StoredSnapshot<'_>>(&bytes) {
        Ok(stored) => Ok(Some(Snapshot {
            version: Version(stored.version),
            payload: stored.payload.to_vec(),
        })),
        Err(e) => {
            warn!(%stream, error = %e, "snapshot record does not decode; ignoring it");
            Ok(None)
        }
    }
}

/// The checkpoint saved under `name` (a big-endian u64), if any.
pub(super) fn load_checkpoint(
    handles: &Handles,
    name: &str,
) -> Result<Option<Position>, ReadError> {
    Ok(handles
        .checkpoints
        .get(name)
        .map_err(sled_error)?
        .map(|v| decode_u64(&v).map(Position))
        .transpose()?)
}

#[cfg(test)]
mod tests {
    use super::super::format::tests::encode;
    use super::super::format::{encode_chunk, stream_key};
    use super::*;
    use crate::event::{ExpectedVersion, NewEvent};
    use crate::store::EventStore;
    use crate::SledStore;

    /// A stream read keeps the last chunk it read: streams that share
    /// chunks (appends of one group) still read back only their own
    /// events, in order, both ways.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_that_share_chunks_read_back_their_own_events() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(SledStore::open(dir.path().join("store")).unwrap());
        let streams: Vec<StreamId> = (0..3)
            .map(|i| StreamId::new(format!("order-{i}")).unwrap())
            .collect();
        let appends = (0..300).map(|n| {
            let store = std::sync::Arc::clone(&store);
            let stream = streams[n % 3].clone();
            tokio::spawn(async move {
                let events = (0..1 + n % 2)
                    .map(|_| NewEvent::new("Placed", vec![n as u8]))
                    .collect();
                store
                    .append(&stream, ExpectedVersion::Any, events)
                    .await
                    .unwrap()
            })
        });
        for append in appends.collect::<Vec<_>>() {
            append.await.unwrap();
        }
        let chunks = store.tree("log").unwrap().scan_prefix([b'C']).count();
        assert!(chunks < 450, "the appends should share chunks: {chunks}");
        let all = store
            .read_all(
                Position::START,
                ReadDirection::Forward,
                1000,
                &EventFilter::All,
            )
            .await
            .unwrap();
        for stream in &streams {
            let filter = EventFilter::Stream(stream.clone());
            let expected = store
                .read_all(Position::START, ReadDirection::Forward, 1000, &filter)
                .await
                .unwrap();
            let own: Vec<_> = all
                .iter()
                .filter(|e| &e.stream_id == stream)
                .cloned()
                .collect();
            assert_eq!(expected, own);
            let forward = store
                .read_stream(stream, Version::FIRST, ReadDirection::Forward, 1000)
                .await
                .unwrap();
            assert_eq!(forward, own);
            let mut backward = store
                .read_stream(stream, Version::MAX, ReadDirection::Backward, 1000)
                .await
                .unwrap();
            backward.reverse();
            assert_eq!(backward, own);
        }
    }

    /// The writer applies a group to sled before it is durable; until the
    /// head moves, no read may return it (it could still be lost). Staged
    /// here by writing a chunk and its index entry past the head.
    #[tokio::test]
    async fn reads_stop_at_the_acknowledged_head() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path().join("store")).unwrap();
        let id = StreamId::new("order-1").unwrap();
        let event = || NewEvent::new("Placed", vec![1]);
        store
            .append(&id, ExpectedVersion::Any, vec![event(), event()])
            .await
            .unwrap();
        let mut record = encode("order-1", "Placed");
        // `encode` writes version 3, the next one: position 3, unacknowledged.
        let log = store.tree("log").unwrap();
        log.insert(chunk_key(3), encode_chunk(&[&record])).unwrap();
        log.insert(stream_key("order-1", 3), &3u64.to_be_bytes())
            .unwrap();
        drop(log);
        record.clear();

        let positions = |events: Vec<RecordedEvent>| -> Vec<u64> {
            events.iter().map(|event| event.position.0).collect()
        };
        let stream_filter = EventFilter::Stream(id.clone());
        for filter in [EventFilter::All, stream_filter] {
            let forward = store
                .read_all(Position::START, ReadDirection::Forward, 10, &filter)
                .await
                .unwrap();
            assert_eq!(positions(forward), [1, 2], "{filter:?}");
            let backward = store
                .read_all(Position::END, ReadDirection::Backward, 10, &filter)
                .await
                .unwrap();
            assert_eq!(positions(backward), [2, 1], "{filter:?}");
            let beyond = store
                .read_all(Position(3), ReadDirection::Forward, 10, &filter)
                .await
                .unwrap();
            assert!(beyond.is_empty(), "{filter:?}");
        }
        let forward = store
            .read_stream(&id, Version::FIRST, ReadDirection::Forward, 10)
            .await
            .unwrap();
        assert_eq!(positions(forward), [1, 2]);
        let backward = store
            .read_stream(&id, Version::MAX, ReadDirection::Backward, 10)
            .await
            .unwrap();
        assert_eq!(positions(backward), [2, 1]);
        assert_eq!(store.stream_version(&id).await.unwrap(), Version(2));
    }
}
