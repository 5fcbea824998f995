//! The on-disk format of the `log` and `snapshots` trees: keys, records and
//! [`FORMAT_VERSION`]. docs/design.md describes it byte by byte; the writer
//! builds keys and records here and the read paths decode them here.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::StoreError;
use crate::event::{EventFilter, Metadata, Position, RecordedEvent, StreamId, Version};

/// The on-disk format this build reads and writes (docs/design.md).
pub const FORMAT_VERSION: u32 = 5;

// Key prefixes of the `log` tree. One tree, so that one `sled::Batch` commits
// a group's events, their indexes and the new head atomically.
pub(super) const CHUNK: u8 = b'C';
/// The prefix of format 2's one-record-per-key log, read only by the
/// upgrade from it.
pub(super) const EVENT: u8 = b'E';
pub(super) const STREAM: u8 = b'S';
/// Formats 2 to 4's one key per event id, read only by the upgrade.
pub(super) const EVENT_ID: u8 = b'I';
/// A block of a run of the event-id index (format 5, `id_index.rs`).
pub(super) const ID_BLOCK: u8 = b'J';
/// A piece of a run's summary: its fences and filter.
pub(super) const ID_SUMMARY: u8 = b'K';
/// The live runs of the event-id index.
pub(super) const META_RUNS: &[u8] = b"Mruns";
pub(super) const META_FORMAT: &[u8] = b"Mformat";
pub(super) const META_HEAD: &[u8] = b"Mhead";
/// Present while an upgrade from format 2 is under way (docs/design.md,
/// "Upgrading a store of an earlier format").
pub(super) const META_UPGRADING: &[u8] = b"Mupgrading";
/// The last position whose stream entries are in blocks and whose ids are
/// in listed runs (format 5: both indexes are written off the commit path,
/// see `stream_index.rs` and `id_index.rs`).
pub(super) const META_INDEXED: &[u8] = b"Mindexed";

/// An event record, as stored in a chunk (format 2: under `E + position`). Strings and bytes borrow
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

/// Encodes `event` as its record, byte for byte what the writer stores in
/// a chunk for an append and the offline import for an exported event.
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
    // Room for the whole record up front: the ids and varints take at most
    // 16 x 3 + 10 x 4 + 3 bytes, each string and byte field its length
    // plus a varint of at most 5.
    let extra: usize = event
        .metadata
        .extra
        .iter()
        .map(|(k, v)| k.len() + v.len() + 10)
        .sum();
    let capacity = 120 + event.stream_id.as_str().len() + event.event_type.len() + extra;
    let buffer = Vec::with_capacity(capacity + event.payload.len());
    postcard::to_extend(&record, buffer)
        .map_err(|e| corrupt(format!("cannot encode an event: {e}")))
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

/// Records of consecutive positions kept under one `C` key, up to this many
/// bytes of records (one larger record gets a chunk of its own). sled 0.34
/// writes a page larger than a quarter of its 512 KiB segments to a blob
/// file of its own, and a leaf holds up to 17 keys: 4 KiB chunks keep a
/// full leaf near 70 KiB, inline in the log.
pub(super) const CHUNK_TARGET_BYTES: usize = 4096;

/// `C + first position`: the key of the chunk whose first event is at
/// `first`.
pub(super) fn chunk_key(first: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = CHUNK;
    key[1..].copy_from_slice(&first.to_be_bytes());
    key
}

/// Encodes one chunk: the record count (u32 BE), each record's end offset
/// in the record area (u32 BE), then the records.
pub(super) fn encode_chunk<R: AsRef<[u8]>>(records: &[R]) -> Vec<u8> {
    let area: usize = records.iter().map(|r| r.as_ref().len()).sum();
    let mut chunk = Vec::with_capacity(4 + 4 * records.len() + area);
    chunk.extend_from_slice(&(records.len() as u32).to_be_bytes());
    let mut end = 0u32;
    for record in records {
        end += record.as_ref().len() as u32;
        chunk.extend_from_slice(&end.to_be_bytes());
    }
    for record in records {
        chunk.extend_from_slice(record.as_ref());
    }
    chunk
}

/// Stages `records`, the encoded events at `first`, `first + 1`, ..., as
/// chunks of at most [`CHUNK_TARGET_BYTES`] each (a larger record alone);
/// returns how many.
pub(super) fn stage_chunks<R: AsRef<[u8]>>(
    batch: &mut sled::Batch,
    first: u64,
    records: &[R],
) -> usize {
    let mut chunks = 0;
    let mut start = 0;
    let mut bytes = 0;
    for (index, record) in records.iter().enumerate() {
        let len = record.as_ref().len();
        if index > start && bytes + len > CHUNK_TARGET_BYTES {
            batch.insert(
                &chunk_key(first + start as u64),
                encode_chunk(&records[start..index]),
            );
            chunks += 1;
            start = index;
            bytes = 0;
        }
        bytes += len;
    }
    if start < records.len() {
        batch.insert(
            &chunk_key(first + start as u64),
            encode_chunk(&records[start..]),
        );
        chunks += 1;
    }
    chunks
}

/// A stored chunk, its layout checked: the events at `first ..= last()`.
pub(super) struct Chunk {
    first: u64,
    count: usize,
    bytes: sled::IVec,
}

impl Chunk {
    /// Parses the chunk stored under `key` as `bytes`.
    pub(super) fn parse(key: &[u8], bytes: sled::IVec) -> Result<Self, StoreError> {
        let first = key
            .strip_prefix(&[CHUNK])
            .ok_or_else(|| corrupt("a chunk key without its prefix"))
            .and_then(decode_u64)?;
        let bad = |what: &str| corrupt(format_args!("chunk at position {first}: {what}"));
        let count = bytes
            .get(..4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
            .ok_or_else(|| bad("shorter than its header"))?;
        if count == 0 || first == 0 || first.checked_add(count as u64 - 1).is_none() {
            return Err(bad("empty, at position 0, or past the last position"));
        }
        let area = count
            .checked_mul(4)
            .and_then(|table| table.checked_add(4))
            .filter(|&start| start <= bytes.len())
            .ok_or_else(|| bad("shorter than its offset table"))?;
        let chunk = Self {
            first,
            count,
            bytes,
        };
        let mut previous = 0;
        for index in 0..count {
            let end = chunk.end(index);
            if end < previous {
                return Err(bad("offsets out of order"));
            }
            previous = end;
        }
        if area + previous != chunk.bytes.len() {
            return Err(bad("its offsets do not end at its length"));
        }
        Ok(chunk)
    }

    /// The position of its first event.
    pub(super) fn first(&self) -> u64 {
        self.first
    }

    /// The position of its last event.
    pub(super) fn last(&self) -> u64 {
        // `parse` checked that this does not overflow.
        self.first + (self.count as u64 - 1)
    }

    fn end(&self, index: usize) -> usize {
        let at = 4 + 4 * index;
        u32::from_be_bytes(self.bytes[at..at + 4].try_into().expect("4 bytes")) as usize
    }

    /// The record of the event at `position`, if this chunk holds it.
    pub(super) fn record(&self, position: u64) -> Option<&[u8]> {
        let index = usize::try_from(position.checked_sub(self.first)?).ok()?;
        if index >= self.count {
            return None;
        }
        let area = 4 + 4 * self.count;
        let start = if index == 0 { 0 } else { self.end(index - 1) };
        Some(&self.bytes[area + start..area + self.end(index)])
    }
}

/// The chunk that holds the event at `position`, if any: one descent of
/// the tree (the last chunk starting at or before it).
pub(super) fn chunk_at(log: &sled::Tree, position: u64) -> Result<Option<Chunk>, StoreError> {
    let found = log
        .range(chunk_key(0)..=chunk_key(position))
        .next_back()
        .transpose()
        .map_err(super::sled_error)?;
    match found {
        None => Ok(None),
        Some((key, value)) => {
            let chunk = Chunk::parse(&key, value)?;
            Ok((chunk.last() >= position).then_some(chunk))
        }
    }
}

/// The stored record of the event at `position`, decoded as a
/// [`RecordedEvent`] (`None` when no chunk holds it).
pub(super) fn event_at(
    log: &sled::Tree,
    position: u64,
    decoder: &mut RecordDecoder,
) -> Result<Option<RecordedEvent>, StoreError> {
    match chunk_at(log, position)? {
        None => Ok(None),
        Some(chunk) => {
            let record = chunk.record(position).expect("the chunk holds it");
            decoder.decode(position, record, &EventFilter::All)
        }
    }
}

/// The position `Mhead` holds (0 when it is not there).
pub(super) fn stored_head(log: &sled::Tree) -> Result<u64, StoreError> {
    log.get(META_HEAD)
        .map_err(super::sled_error)?
        .map(|v| decode_u64(&v))
        .transpose()
        .map(Option::unwrap_or_default)
}

/// The position of the last stored event (0 when none): the last chunk's
/// last, one descent of the tree.
pub(super) fn last_position(log: &sled::Tree) -> Result<u64, StoreError> {
    match log
        .scan_prefix([CHUNK])
        .next_back()
        .transpose()
        .map_err(super::sled_error)?
    {
        None => Ok(0),
        Some((key, value)) => Ok(Chunk::parse(&key, value)?.last()),
    }
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

    fn chunk(first: u64, bytes: Vec<u8>) -> Result<Chunk, StoreError> {
        Chunk::parse(&chunk_key(first), sled::IVec::from(bytes))
    }

    #[test]
    fn a_chunk_gives_back_each_record_at_its_position() {
        let records: Vec<Vec<u8>> = vec![b"a".to_vec(), Vec::new(), b"ccc".to_vec()];
        let parsed = chunk(10, encode_chunk(&records)).unwrap();
        assert_eq!((parsed.first(), parsed.last()), (10, 12));
        assert_eq!(parsed.record(9), None);
        assert_eq!(parsed.record(10), Some(&b"a"[..]));
        assert_eq!(parsed.record(11), Some(&b""[..]));
        assert_eq!(parsed.record(12), Some(&b"ccc"[..]));
        assert_eq!(parsed.record(13), None);
    }

    #[test]
    fn a_chunk_whose_layout_does_not_hold_is_corrupt() {
        let good = encode_chunk(&[b"ab".to_vec(), b"cd".to_vec()]);
        let mut cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            good[..3].to_vec(),
            good[..good.len() - 1].to_vec(),
            [good.as_slice(), b"x"].concat(),
            encode_chunk::<Vec<u8>>(&[]),
        ];
        let mut unordered = good.clone();
        unordered[4..8].copy_from_slice(&3u32.to_be_bytes());
        unordered[8..12].copy_from_slice(&1u32.to_be_bytes());
        cases.push(unordered);
        let mut huge_count = good.clone();
        huge_count[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        cases.push(huge_count);
        for bytes in cases {
            assert!(
                matches!(chunk(1, bytes.clone()), Err(StoreError::Corrupt(_))),
                "{bytes:?}"
            );
        }
        assert!(matches!(
            chunk(0, good.clone()),
            Err(StoreError::Corrupt(_))
        ));
        // Its last position would be past u64::MAX.
        assert!(matches!(chunk(u64::MAX, good), Err(StoreError::Corrupt(_))));
        let one = encode_chunk(&[b"x".to_vec()]);
        assert_eq!(chunk(u64::MAX, one).unwrap().last(), u64::MAX);
    }

    #[test]
    fn a_group_is_staged_as_chunks_of_bounded_size() {
        let records: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 100]).collect();
        let big = vec![vec![7u8; 3 * CHUNK_TARGET_BYTES]];
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = db.open_tree("log").unwrap();
        let mut batch = sled::Batch::default();
        let chunks = stage_chunks(&mut batch, 1, &records) + stage_chunks(&mut batch, 101, &big);
        log.apply_batch(batch).unwrap();
        assert_eq!(chunks, log.len());
        // 100-byte records: 40 to a chunk, then the big one alone.
        assert_eq!(chunks, 4);
        let mut next = 1;
        for entry in log.iter() {
            let (key, value) = entry.unwrap();
            let parsed = Chunk::parse(&key, value.clone()).unwrap();
            assert_eq!(parsed.first(), next);
            assert!(value.len() <= CHUNK_TARGET_BYTES + 4 + 4 * 40 || parsed.first() == 101);
            next = parsed.last() + 1;
        }
        assert_eq!(next, 102);
        for position in 1..=100 {
            let found = chunk_at(&log, position).unwrap().unwrap();
            assert_eq!(
                found.record(position).unwrap(),
                records[position as usize - 1]
            );
        }
        assert_eq!(
            chunk_at(&log, 101).unwrap().unwrap().record(101),
            Some(&big[0][..])
        );
        assert!(chunk_at(&log, 102).unwrap().is_none());
        assert_eq!(last_position(&log).unwrap(), 101);
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
