//! [`stats`] and [`streams`]: what a store holds, from one scan of the log;
//! and the offline checkpoint edits [`set_checkpoint`] and
//! [`delete_checkpoint`].

use std::collections::BTreeMap;

use serde::Serialize;

use super::error::OpsError;
use super::inspect::Inspect;
use crate::event::{category_of, EventFilter, Position, ReadDirection, RecordedEvent};
use crate::store::validate_checkpoint_name;

/// Events read per page by the scans of this module.
pub(super) const PAGE: usize = 2048;

/// What a store holds, as [`stats`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StoreSummary {
    /// The backend's name.
    pub backend: String,
    /// The store's format version.
    pub format_version: u32,
    /// The last committed position.
    pub head: u64,
    /// Events in the log (equal to `head` in a sound store).
    pub events: u64,
    /// Streams with at least one event.
    pub streams: u64,
    /// Per category: streams and events, by name.
    pub categories: Vec<CategorySummary>,
    /// Bytes on disk (the directory, or the tables with their indexes).
    pub size_on_disk_bytes: u64,
    /// Stored snapshots.
    pub snapshots: u64,
    /// Saved checkpoints, with how far each is behind the head.
    pub checkpoints: Vec<CheckpointSummary>,
}

/// One category of [`StoreSummary`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CategorySummary {
    /// The category (the stream id's part before the first `-`).
    pub category: String,
    /// Its streams.
    pub streams: u64,
    /// Its events.
    pub events: u64,
}

/// One checkpoint of [`StoreSummary`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CheckpointSummary {
    /// The checkpoint's name (a projection's, or `relay:<name>`).
    pub name: String,
    /// The position saved.
    pub position: u64,
    /// Events between it and the head (0 when caught up).
    pub behind: u64,
}

/// One stream, as [`streams`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StreamSummary {
    /// The stream id.
    pub stream: String,
    /// Its category.
    pub category: String,
    /// Its version (its last event's).
    pub version: u64,
    /// Its events.
    pub events: u64,
    /// The position of its first event.
    pub first_position: u64,
    /// The position of its last event.
    pub last_position: u64,
    /// The type of its last event.
    pub last_event_type: String,
    /// When its last event was recorded, in microseconds since the epoch.
    pub last_recorded_at_micros: u64,
}

/// Reads the whole log up to `head` in position order, page by page.
pub(super) async fn scan(
    store: &dyn Inspect,
    head: Position,
    mut each: impl FnMut(&RecordedEvent),
) -> Result<(), OpsError> {
    let mut from = Position(1);
    while from <= head {
        let page = store
            .read_all(from, ReadDirection::Forward, PAGE, &EventFilter::All)
            .await?;
        let Some(last) = page.last() else { break };
        from = last.position.next();
        page.iter()
            .filter(|e| e.position <= head)
            .for_each(&mut each);
    }
    Ok(())
}

/// Summarizes the store: events, streams, categories, head, format, size on
/// disk, snapshots, and each checkpoint with how far it is behind the head.
/// One scan of the log, up to the head read at the start.
///
/// # Errors
/// The store's, including a record that does not decode ([`verify`](super::verify)
/// finds every one).
pub async fn stats(store: &dyn Inspect) -> Result<StoreSummary, OpsError> {
    let head = store.stored_head().await?;
    let mut events = 0;
    let mut streams: BTreeMap<String, u64> = BTreeMap::new();
    scan(store, head, |event| {
        events += 1;
        *streams
            .entry(event.stream_id.as_str().to_owned())
            .or_default() += 1;
    })
    .await?;
    let mut categories: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (stream, count) in &streams {
        let entry = categories.entry(category_of(stream)).or_default();
        entry.0 += 1;
        entry.1 += count;
    }
    let checkpoints = store
        .checkpoints()
        .await?
        .into_iter()
        .map(|(name, position)| CheckpointSummary {
            name,
            position: position.0,
            behind: head.0.saturating_sub(position.0),
        })
        .collect();
    Ok(StoreSummary {
        backend: store.backend_name().to_owned(),
        format_version: store.format_version(),
        head: head.0,
        events,
        streams: streams.len() as u64,
        categories: categories
            .into_iter()
            .map(|(category, (streams, events))| CategorySummary {
                category: category.to_owned(),
                streams,
                events,
            })
            .collect(),
        size_on_disk_bytes: store.size_on_disk().await?,
        snapshots: store.snapshots().await?.len() as u64,
        checkpoints,
    })
}

/// The streams of the store (of one category if given), by stream id, at
/// most `limit` of them. One scan of the log.
///
/// # Errors
/// As [`stats`].
pub async fn streams(
    store: &dyn Inspect,
    category: Option<&str>,
    limit: usize,
) -> Result<Vec<StreamSummary>, OpsError> {
    let head = store.stored_head().await?;
    let mut streams: BTreeMap<String, StreamSummary> = BTreeMap::new();
    scan(store, head, |event| {
        if category.is_some_and(|c| c != event.stream_id.category()) {
            return;
        }
        let summary = streams
            .entry(event.stream_id.as_str().to_owned())
            .or_insert_with(|| StreamSummary {
                stream: event.stream_id.as_str().to_owned(),
                category: event.stream_id.category().to_owned(),
                version: 0,
                events: 0,
                first_position: event.position.0,
                last_position: 0,
                last_event_type: String::new(),
                last_recorded_at_micros: 0,
            });
        summary.version = event.version.0;
        summary.events += 1;
        summary.last_position = event.position.0;
        summary.last_event_type.clone_from(&event.event_type);
        summary.last_recorded_at_micros = event.recorded_at_micros;
    })
    .await?;
    Ok(streams.into_values().take(limit).collect())
}

/// Sets checkpoint `name` to `position`, durably, so that its projection
/// resumes after that position when it next starts (0 replays it from the
/// beginning). Meant for a stopped projection: a running one overwrites it
/// at its next save. Returns the position it replaced.
///
/// # Errors
/// [`OpsError::InvalidInput`] for a bad name, [`OpsError::PastHead`] for a
/// position past the head (nothing is written);
/// the store's.
pub async fn set_checkpoint(
    store: &dyn Inspect,
    name: &str,
    position: Position,
) -> Result<Option<Position>, OpsError> {
    validate_checkpoint_name(name)?;
    let head = store.stored_head().await?;
    if position > head {
        return Err(OpsError::PastHead {
            position: position.0,
            head: head.0,
        });
    }
    let old = store.load_checkpoint(name).await?;
    store.save_checkpoint(name, position).await?;
    Ok(old)
}

/// Deletes checkpoint `name`, durably; its projection then starts from the
/// beginning. Returns whether there was one.
///
/// # Errors
/// [`OpsError::InvalidInput`] for a bad name; the store's.
pub async fn delete_checkpoint(store: &dyn Inspect, name: &str) -> Result<bool, OpsError> {
    validate_checkpoint_name(name)?;
    Ok(store.delete_checkpoint(name).await?)
}
