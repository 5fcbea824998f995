//! The sled store's event record (formats 3 and 4, docs/design.md "Tree `log`"),
//! written again here so that the physical baselines work on the very bytes
//! the store writes: decoding them from memory into the owned
//! [`RecordedEvent`] a catch-up hands out, and appending them to a plain
//! file with one `write` + `fdatasync` per group.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use annals::store::Metadata;
use annals::{Position, RecordedEvent, StreamId, Version};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

type Result<T, E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

/// A record of a chunk, field for field.
#[derive(Serialize, Deserialize)]
struct StoredRecord<'a> {
    event_id: Uuid,
    #[serde(borrow)]
    stream: &'a str,
    version: u64,
    #[serde(borrow)]
    event_type: &'a str,
    schema_version: u16,
    recorded_at_micros: u64,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    #[serde(borrow)]
    extra: Vec<(&'a str, &'a str)>,
    #[serde(with = "serde_bytes", borrow)]
    payload: &'a [u8],
}

/// `event` encoded as the sled store stores it.
pub(crate) fn encode(event: &RecordedEvent) -> Result<Vec<u8>> {
    let extra = event
        .metadata
        .extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let record = StoredRecord {
        event_id: event.event_id,
        stream: event.stream_id.as_str(),
        version: event.version.0,
        event_type: &event.event_type,
        schema_version: event.schema_version,
        recorded_at_micros: event.recorded_at_micros,
        correlation_id: event.metadata.correlation_id,
        causation_id: event.metadata.causation_id,
        extra,
        payload: &event.payload,
    };
    Ok(postcard::to_stdvec(&record)?)
}

/// Decodes every record into an owned [`RecordedEvent`] (positions
/// numbered from 1), as a reader of the log must; returns events/s.
pub(crate) fn decode_rate(records: &[Vec<u8>]) -> Result<f64> {
    let start = Instant::now();
    let mut bytes = 0usize;
    for (n, record) in records.iter().enumerate() {
        let stored: StoredRecord<'_> = postcard::from_bytes(record)?;
        let event = RecordedEvent {
            event_id: stored.event_id,
            stream_id: StreamId::new(stored.stream)?,
            version: Version(stored.version),
            position: Position(n as u64 + 1),
            event_type: stored.event_type.to_owned(),
            schema_version: stored.schema_version,
            recorded_at_micros: stored.recorded_at_micros,
            metadata: Metadata {
                correlation_id: stored.correlation_id,
                causation_id: stored.causation_id,
                extra: stored
                    .extra
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
            },
            payload: stored.payload.to_vec(),
        };
        bytes += event.payload.len();
        std::hint::black_box(&event);
    }
    std::hint::black_box(bytes);
    Ok(records.len() as f64 / start.elapsed().as_secs_f64())
}

/// What the plain-file log measured.
pub(crate) struct FileLog {
    pub(crate) events_per_s: f64,
    /// Median time of one `fdatasync`.
    pub(crate) fdatasync: Duration,
    pub(crate) groups: usize,
}

/// The physical limit of a durable log on this disk and this encoder: one
/// thread appends `records` (cycling through them) to a plain file at
/// `path`, `group` records per `write` (each length-prefixed, as a log must
/// frame them) followed by one `fdatasync`, for `run`.
pub(crate) fn file_log(
    path: &Path,
    records: &[Vec<u8>],
    group: usize,
    run: Duration,
) -> Result<FileLog> {
    let mut file = File::create(path)?;
    let mut buffer = Vec::new();
    let mut syncs = Vec::new();
    let mut written = 0usize;
    let start = Instant::now();
    while start.elapsed() < run {
        buffer.clear();
        for _ in 0..group {
            let record = &records[written % records.len()];
            buffer.extend_from_slice(&(record.len() as u32).to_le_bytes());
            buffer.extend_from_slice(record);
            written += 1;
        }
        file.write_all(&buffer)?;
        let sync = Instant::now();
        file.sync_data()?;
        syncs.push(sync.elapsed());
    }
    let elapsed = start.elapsed();
    syncs.sort();
    Ok(FileLog {
        events_per_s: written as f64 / elapsed.as_secs_f64(),
        fdatasync: syncs[syncs.len() / 2],
        groups: syncs.len(),
    })
}
