//! The on-disk format of the `log` and `snapshots` trees: keys, records and
//! [`FORMAT_VERSION`]. docs/design.md describes it byte by byte; the writer
//! builds keys and records here and the read paths decode them here.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::StoreError;
use crate::event::{EventFilter, Metadata, Position, RecordedEvent, StreamId, Version};

/// The on-disk format this build reads and writes (docs/design.md).
pub const FORMAT_VERSION: u32 = 2;

// Key prefixes of the `log` tree. One tree, so that one `sled::Batch` commits
// an append's events, its indexes and the new head atomically.
pub(super) const EVENT: u8 = b'E';
pub(super) const STREAM: u8 = b'S';
pub(super) const EVENT_ID: u8 = b'I';
pub(super) const META_FORMAT: &[u8] = b"Mformat";
pub(super) const META_HEAD: &[u8] = b"Mhead";

/// An event record as stored under `E + position`. Strings and bytes borrow
/// from the stored value when decoding, so that a filtered scan allocates
/// only for the events it returns. The stream id and the event type are
/// (de)serialized as bytes, which postcard encodes exactly as it encodes a
/// `str` (a varint length, then the bytes): the format is unchanged, and a
/// scan checks their UTF-8 only when they differ from the previous record's
/// (see [`RecordDecoder`]).
#[derive(Serialize, Deserialize)]
pub(super) struct StoredRecord<'a> {
    pub(super) event_id: Uuid,
    #[serde(with = "serde_bytes")]
    pub(super) stream: &'a [u8],
    pub(super) version: u64,
    #[serde(with = "serde_bytes")]
    pub(super) event_type: &'a [u8],
    pub(super) schema_version: u16,
    pub(super) recorded_at_micros: u64,
    pub(super) correlation_id: Option<Uuid>,
    pub(super) causation_id: Option<Uuid>,
    pub(super) extra: Vec<(&'a str, &'a str)>,
    #[serde(with = "serde_bytes")]
    pub(super) payload: &'a [u8],
}

/// Encodes `event` as its `E` record, byte for byte what the writer stores
/// for an append and the offline import stores for an exported event.
pub(super) fn encode_record(event: &RecordedEvent) -> Result<Vec<u8>, StoreError> {
    let record = StoredRecord {
        event_id: event.event_id,
        stream: event.stream_id.as_str().as_bytes(),
        version: event.version.0,
        event_type: event.event_type.as_bytes(),
        schema_version: event.schema_version,
        recorded_at_micros: event.recorded_at_micros,
        correlation_id: event.metadata.correlation_id,
        causation_id: event.metadata.causation_id,
        extra: event
            .metadata
            .extra
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        payload: &event.payload,
    };
    postcard::to_stdvec(&record).map_err(|e| corrupt(format!("cannot encode an event: {e}")))
}

/// Stages `event`'s record (`record`, from [`encode_record`]) and its two
/// index entries in `batch`: the three keys every stored event has.
pub(super) fn stage_event(batch: &mut sled::Batch, event: &RecordedEvent, record: Vec<u8>) {
    let position = event.position.0.to_be_bytes();
    batch.insert(&event_key(event.position.0), record);
    batch.insert(
        stream_key(event.stream_id.as_str(), event.version.0),
        &position,
    );
    batch.insert(&id_key(event.event_id), &position);
}

#[derive(Serialize, Deserialize)]
pub(super) struct StoredSnapshot<'a> {
    pub(super) version: u64,
    #[serde(with = "serde_bytes")]
    pub(super) payload: &'a [u8],
}

pub(super) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

pub(super) fn event_key(position: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = EVENT;
    key[1..].copy_from_slice(&position.to_be_bytes());
    key
}

/// `S + stream + \0`: the prefix of one stream's index keys. Stream ids hold
/// no `\0`, so no stream's prefix is a prefix of another's.
pub(super) fn stream_prefix(stream: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream.len() + 10);
    key.push(STREAM);
    key.extend_from_slice(stream.as_bytes());
    key.push(0);
    key
}

pub(super) fn stream_key(stream: &str, version: u64) -> Vec<u8> {
    let mut key = stream_prefix(stream);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

/// The version of `stream`'s last event (0 when it has none): the last key
/// of its index, one descent of the tree. Format 1 kept a head key per
/// stream instead; writing it cost a fifth of sled's work per event.
pub(super) fn stream_head(log: &sled::Tree, stream: &str) -> Result<u64, StoreError> {
    let start = stream_prefix(stream);
    let mut end = start.clone();
    // The prefix ends in 0x00; 0x01 in its place bounds exactly this stream.
    *end.last_mut().expect("the prefix ends in 0x00") = 1;
    match log.range(start.as_slice()..end.as_slice()).next_back() {
        None => Ok(0),
        Some(entry) => {
            let (key, _) = entry.map_err(super::sled_error)?;
            let version = key.get(start.len()..).unwrap_or_default();
            decode_u64(version)
        }
    }
}

pub(super) fn id_key(id: Uuid) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = EVENT_ID;
    key[1..].copy_from_slice(id.as_bytes());
    key
}

pub(super) fn decode_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| corrupt(format_args!("expected 8 bytes, found {}", bytes.len())))?;
    Ok(u64::from_be_bytes(array))
}

pub(super) fn decode_record(position: u64, bytes: &[u8]) -> Result<StoredRecord<'_>, StoreError> {
    postcard::from_bytes(bytes)
        .map_err(|e| corrupt(format_args!("event at position {position}: {e}")))
}

pub(super) fn record_utf8(position: u64, bytes: &[u8]) -> Result<&str, StoreError> {
    std::str::from_utf8(bytes)
        .map_err(|e| corrupt(format_args!("event at position {position}: {e}")))
}

/// Builds [`RecordedEvent`]s from stored records, one read at a time. The
/// events of one append sit next to each other in the log and share their
/// stream (and often their type), so the decoder keeps the previous event's
/// stream id and type and reuses them while the bytes repeat: a scan checks
/// and allocates a stream id once per run of events rather than per event.
#[derive(Default)]
pub(super) struct RecordDecoder {
    stream: Option<StreamId>,
    event_type: String,
}

impl RecordDecoder {
    /// The event stored at `position` as `bytes`, or `None` when it does not
    /// pass `filter` (a filtered-out event's stream id is not validated).
    pub(super) fn decode(
        &mut self,
        position: u64,
        bytes: &[u8],
        filter: &EventFilter,
    ) -> Result<Option<RecordedEvent>, StoreError> {
        let record = decode_record(position, bytes)?;
        let known_stream = self
            .stream
            .as_ref()
            .filter(|known| known.as_str().as_bytes() == record.stream);
        let stream = match known_stream {
            Some(known) => known.as_str(),
            None => record_utf8(position, record.stream)?,
        };
        let known_type = self.event_type.as_bytes() == record.event_type;
        let event_type = if known_type {
            self.event_type.as_str()
        } else {
            record_utf8(position, record.event_type)?
        };
        if !filter.matches(stream, event_type) {
            return Ok(None);
        }
        let event_type = event_type.to_owned();
        let stream_id = match known_stream {
            Some(known) => known.clone(),
            None => {
                let stream_id = StreamId::new(stream)
                    .map_err(|e| corrupt(format_args!("event at position {position}: {e}")))?;
                self.stream = Some(stream_id.clone());
                stream_id
            }
        };
        if !known_type {
            self.event_type.clone_from(&event_type);
        }
        Ok(Some(RecordedEvent {
            event_id: record.event_id,
            stream_id,
            version: Version(record.version),
            position: Position(position),
            event_type,
            schema_version: record.schema_version,
            recorded_at_micros: record.recorded_at_micros,
            metadata: Metadata {
                correlation_id: record.correlation_id,
                causation_id: record.causation_id,
                extra: record
                    .extra
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            },
            payload: record.payload.to_vec(),
        }))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The record as it was first declared, with `str` fields.
    #[derive(Serialize)]
    struct StrRecord<'a> {
        event_id: Uuid,
        stream: &'a str,
        version: u64,
        event_type: &'a str,
        schema_version: u16,
        recorded_at_micros: u64,
        correlation_id: Option<Uuid>,
        causation_id: Option<Uuid>,
        extra: Vec<(&'a str, &'a str)>,
        #[serde(with = "serde_bytes")]
        payload: &'a [u8],
    }

    /// A record of `stream` and `event_type` at version 3, encoded.
    pub(in crate::store::sled) fn encode(stream: &str, event_type: &str) -> Vec<u8> {
        let record = StoredRecord {
            event_id: Uuid::from_u128(7),
            stream: stream.as_bytes(),
            version: 3,
            event_type: event_type.as_bytes(),
            schema_version: 2,
            recorded_at_micros: 11,
            correlation_id: Some(Uuid::from_u128(9)),
            causation_id: None,
            extra: vec![("tenant", "é")],
            payload: b"payload",
        };
        postcard::to_stdvec(&record).unwrap()
    }

    #[test]
    fn byte_fields_encode_as_the_str_fields_did() {
        let bytes = encode("order-1", "OrderPlaced");
        let as_str = postcard::to_stdvec(&StrRecord {
            event_id: Uuid::from_u128(7),
            stream: "order-1",
            version: 3,
            event_type: "OrderPlaced",
            schema_version: 2,
            recorded_at_micros: 11,
            correlation_id: Some(Uuid::from_u128(9)),
            causation_id: None,
            extra: vec![("tenant", "é")],
            payload: b"payload",
        })
        .unwrap();
        assert_eq!(bytes, as_str);
    }

    #[test]
    fn the_decoder_reuses_only_identical_streams_and_types() {
        let mut decoder = RecordDecoder::default();
        let records = [
            ("order-1", "OrderPlaced"),
            ("order-1", "OrderPlaced"),
            ("order-10", "OrderPlaced"),
            ("order-1", "OrderShipped"),
            ("order-1", "OrderShippe"),
        ];
        for (position, (stream, event_type)) in (1..).zip(records) {
            let event = decoder
                .decode(position, &encode(stream, event_type), &EventFilter::All)
                .unwrap()
                .unwrap();
            assert_eq!(event.stream_id.as_str(), stream);
            assert_eq!(event.event_type, event_type);
            assert_eq!(event.position, Position(position));
            assert_eq!(event.payload, b"payload");
            assert_eq!(event.metadata.extra["tenant"], "é");
        }
    }

    #[test]
    fn the_decoder_checks_what_it_does_not_reuse() {
        let mut decoder = RecordDecoder::default();
        let all = EventFilter::All;
        assert!(decoder.decode(1, &encode("order-1", "A"), &all).is_ok());
        // A reserved stream id is refused even right after a valid one...
        assert!(matches!(
            decoder.decode(2, &encode("$order-1", "A"), &all),
            Err(StoreError::Corrupt(_))
        ));
        // ... but, as before, not when the filter leaves the event out.
        let orders = EventFilter::Category("order".into());
        assert!(matches!(
            decoder.decode(3, &encode("$x", "A"), &orders),
            Ok(None)
        ));
        // Bytes that are not UTF-8 are refused whatever the filter.
        let mut bytes = encode("order-1", "A\u{e9}");
        let index = bytes
            .windows(3)
            .position(|w| w == [b'A', 0xc3, 0xa9])
            .unwrap();
        bytes[index + 1] = 0xff;
        assert!(matches!(
            decoder.decode(4, &bytes, &orders),
            Err(StoreError::Corrupt(_))
        ));
    }
}
