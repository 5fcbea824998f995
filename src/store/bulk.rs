//! Writing events exactly as another store recorded them (positions,
//! versions, ids, timestamps, metadata), for `annals::ops::import`. The
//! backends each write a batch atomically; the checks a batch must pass
//! before anything of it is written are shared here.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use crate::error::StoreError;
use crate::event::{validate_append, NewEvent, RecordedEvent, StreamId};

/// Why a bulk load wrote nothing.
#[derive(Debug)]
pub(crate) enum BulkError {
    /// The store failed.
    Store(StoreError),
    /// An event of the batch cannot continue the store: nothing of the
    /// batch was written.
    Refused {
        /// The event's position.
        position: u64,
        /// What is wrong with it.
        reason: String,
    },
}

impl From<StoreError> for BulkError {
    fn from(error: StoreError) -> Self {
        BulkError::Store(error)
    }
}

/// Checks a batch against the store it continues: positions `head+1..`
/// with no gap, every stream's versions right after its stored head
/// (`stream_head` answers it from the store, asked once per stream), valid
/// names, and no event id stored already (`stored_ids` holds the batch's
/// ids the store has) or twice in the batch.
pub(crate) fn check_batch(
    head: u64,
    events: &[RecordedEvent],
    mut stream_head: impl FnMut(&StreamId) -> Result<u64, StoreError>,
    stored_ids: &HashSet<Uuid>,
) -> Result<(), BulkError> {
    let mut heads: HashMap<StreamId, u64> = HashMap::new();
    let mut ids = HashSet::with_capacity(events.len());
    for (offset, event) in events.iter().enumerate() {
        let position = event.position.0;
        let refuse = |reason: String| BulkError::Refused { position, reason };
        if position != head + 1 + offset as u64 {
            return Err(refuse(format!(
                "expected position {} to continue the store's head {head}",
                head + 1 + offset as u64
            )));
        }
        // The stream id is valid by construction; the other names are not.
        let as_new = NewEvent {
            event_id: event.event_id,
            event_type: event.event_type.clone(),
            schema_version: event.schema_version,
            metadata: event.metadata.clone(),
            payload: Vec::new(),
        };
        validate_append(&[as_new], usize::MAX, "import").map_err(|e| refuse(e.to_string()))?;
        if stored_ids.contains(&event.event_id) || !ids.insert(event.event_id) {
            return Err(refuse(format!(
                "event id {} is stored already",
                event.event_id
            )));
        }
        let stream_version = match heads.get(&event.stream_id) {
            Some(&version) => version,
            None => stream_head(&event.stream_id)?,
        };
        if event.version.0 != stream_version + 1 {
            return Err(refuse(format!(
                "{} is at version {stream_version}; the event has version {}",
                event.stream_id, event.version
            )));
        }
        heads.insert(event.stream_id.clone(), event.version.0);
    }
    Ok(())
}
